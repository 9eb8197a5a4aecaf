"""The recipe's `lora` section through the compiler: either vocabulary resolves to megatron-core names, the
defaults follow the model (a MoE model's MLP linears are inside its experts), provenance is recorded, and
what cannot be expressed is refused with one line naming the field."""

from __future__ import annotations

import pytest

from dpoc.compiler.pipeline import load_and_check, plan_recipe
from dpoc.compiler.resolve import lora, resolver
from dpoc.contract.errors import DpocError
from dpoc.contract.lora import Lora
from tests.conftest import RECIPES

MOE, TINY = RECIPES / "qwen3_30b.yaml", RECIPES / "tiny_cpu.yaml"
SECTION = ["lora.rank=8", "lora.alpha=16"]


def _settings(recipe, overrides):
    v = resolver._Values(load_and_check(recipe, overrides))
    model = resolver._model(v)
    return lora.lora_settings(v, model), v


def _problems(recipe, overrides) -> list[str]:
    with pytest.raises(DpocError) as exc:
        plan_recipe(recipe, overrides)
    return [f"{p.where}: {p.message}" for p in exc.value.problems]


def test_hf_names_resolve_to_the_fused_megatron_linears():
    got, v = _settings(TINY, [*SECTION, "lora.targets=[q_proj,k_proj,v_proj,down_proj]", "lora.dropout=0.05"])
    assert got == Lora(rank=8, alpha=16.0, dropout=0.05, targets=("linear_qkv", "linear_fc2"), experts=False,
                       init_from=None)
    assert got.scaling == 2.0 and got.hf_targets == ("q_proj", "k_proj", "v_proj", "down_proj")
    assert v.provenance["lora.targets"].source == "user:command line" and not v.problems


def test_defaults_are_every_linear_the_model_has_outside_experts_unless_asked():
    dense, v = _settings(TINY, SECTION)
    assert dense.targets == ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2") and dense.dropout == 0.0
    assert v.provenance["lora.targets"].source == "derived:model"
    assert v.provenance["lora.dropout"].source == "default"
    moe, _ = _settings(MOE, SECTION)
    assert moe.targets == ("linear_qkv", "linear_proj") and not moe.experts
    experts, _ = _settings(MOE, [*SECTION, "lora.experts=true"])
    assert experts.targets == ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2") and experts.experts


def test_no_section_no_lora():
    got, v = _settings(TINY, [])
    assert got is None and v.provenance["lora"].source == "default"
    assert plan_recipe(TINY).lora is None


@pytest.mark.parametrize("overrides, line", [
    (["lora.rank=0", "lora.alpha=16"], "lora.rank: must be >= 1 (got 0)"),
    (["lora.rank=8"], "lora.alpha: is required"),
    ([*SECTION, "lora.dropout=1"], "lora.dropout: must be < 1 (got 1)"),
    ([*SECTION, "lora.targets=[foo]"], "lora.targets: unknown LoRA target 'foo'; valid: linear_qkv, linear_proj, "
     "linear_fc1, linear_fc2, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
    ([*SECTION, "lora.targets=[q_proj,v_proj]"], "lora.targets: LoRA target 'q_proj' without k_proj: megatron-core "
     "fuses q_proj, k_proj, v_proj into linear_qkv, so name all of them or 'linear_qkv'"),
    ([*SECTION, "lora.experts=true"], "lora.experts: tiny-qwen3 is a dense model (no experts); valid: false, or "
     "leave it out"),
    ([*SECTION, "lora.init_from=./sft-adapter"], "lora.init_from: loading a PEFT adapter is not supported yet "
     "(valid: leave it out: the adapters start fresh, B at zero)"),
])
def test_bad_sections_are_refused_naming_the_field(overrides, line):
    assert line in _problems(TINY, overrides)


def test_an_expert_only_mlp_target_is_refused_without_experts():
    assert "lora.targets: linear_fc1: this MoE model has MLP linears only inside its routed experts (no shared " \
           "expert); valid: lora.experts: true, or targets among linear_qkv, linear_proj" in _problems(
               MOE, [*SECTION, "lora.targets=[gate_proj,up_proj]"])


def test_a_target_that_cannot_train_it_refuses_it():
    """Until the runtime's adapters exist, the dpoc target may not take a lora section (it would train every
    parameter instead); MindSpeed-RL's is tests/compiler/test_mindspeed_lora.py."""
    assert _problems(TINY, SECTION) == ["lora: not supported yet by runtime: dpoc (valid: remove the lora section)"]
