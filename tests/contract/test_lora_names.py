"""LoRA target names: both vocabularies select the same fused megatron-core linears, and a part of a fused
linear alone is refused with the reason, never widened."""

import pytest

from dpoc.contract.lora import HF_TARGETS, MCORE_TARGETS, Lora, mcore_targets


def test_hf_and_mcore_names_select_the_same_linears():
    assert mcore_targets(list(HF_TARGETS)) == MCORE_TARGETS
    assert mcore_targets(["down_proj", "q_proj", "k_proj", "v_proj"]) == ("linear_qkv", "linear_fc2")
    assert mcore_targets(["linear_fc1", "o_proj"]) == ("linear_proj", "linear_fc1")


def test_part_of_a_fused_linear_is_refused():
    with pytest.raises(ValueError) as err:
        mcore_targets(["q_proj", "v_proj"])
    assert str(err.value) == (
        "LoRA target 'q_proj' without k_proj: megatron-core fuses q_proj, k_proj, v_proj into linear_qkv, "
        "so name all of them or 'linear_qkv'")


def test_unknown_target_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"^unknown LoRA target 'qkv'; valid: linear_qkv, linear_proj, "):
        mcore_targets(["qkv"])


def test_scaling_and_hf_names():
    lora = Lora(rank=8, alpha=16.0, dropout=0.0, targets=("linear_qkv", "linear_fc2"), experts=False,
                init_from=None)
    assert lora.scaling == 2.0
    assert lora.hf_targets == ("q_proj", "k_proj", "v_proj", "down_proj")
