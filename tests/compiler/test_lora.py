"""The recipe's `lora` section through the compiler: either vocabulary resolves to megatron-core names, the
defaults follow the model (a MoE model's MLP linears are inside its experts), provenance is recorded, and
what cannot be expressed is refused with one line naming the field."""

from __future__ import annotations

import pytest

from dpoc.compiler.pipeline import build, plan_recipe
from dpoc.contract import megatron_args
from dpoc.contract.errors import DpocError
from dpoc.contract.lora import Lora
from tests.conftest import RECIPES

MOE, TINY = RECIPES / "qwen3_30b.yaml", RECIPES / "tiny_cpu.yaml"
SECTION = ["lora.rank=8", "lora.alpha=16"]


def _settings(recipe, overrides):
    plan = plan_recipe(recipe, overrides)
    return plan.lora, dict(plan.provenance)


def _problems(recipe, overrides) -> list[str]:
    with pytest.raises(DpocError) as exc:
        plan_recipe(recipe, overrides)
    return [f"{p.where}: {p.message}" for p in exc.value.problems]


def test_hf_names_resolve_to_the_fused_megatron_linears():
    got, v = _settings(TINY, [*SECTION, "lora.targets=[q_proj,k_proj,v_proj,down_proj]", "lora.dropout=0.05"])
    assert got == Lora(rank=8, alpha=16.0, dropout=0.05, targets=("linear_qkv", "linear_fc2"), experts=False,
                       init_from=None)
    assert got.scaling == 2.0 and got.hf_targets == ("q_proj", "k_proj", "v_proj", "down_proj")
    assert v["lora.targets"].source == "user:command line"


def test_defaults_are_every_linear_the_model_has_outside_experts_unless_asked():
    dense, v = _settings(TINY, SECTION)
    assert dense.targets == ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2") and dense.dropout == 0.0
    assert v["lora.targets"].source == "derived:model"
    assert v["lora.dropout"].source == "default"
    moe, _ = _settings(MOE, SECTION)
    assert moe.targets == ("linear_qkv", "linear_proj") and not moe.experts
    experts, _ = _settings(MOE, [*SECTION, "lora.experts=true", "parallelism.moe_grouped_gemm=false"])
    assert experts.targets == ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2") and experts.experts


def test_no_section_no_lora():
    got, v = _settings(TINY, [])
    assert got is None and v["lora"].source == "default"
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
])
def test_bad_sections_are_refused_naming_the_field(overrides, line):
    assert line in _problems(TINY, overrides)


def test_an_expert_only_mlp_target_is_refused_without_experts():
    assert "lora.targets: linear_fc1: this MoE model has MLP linears only inside its routed experts (no shared " \
           "expert); valid: lora.experts: true, or targets among linear_qkv, linear_proj" in _problems(
               MOE, [*SECTION, "lora.targets=[gate_proj,up_proj]"])


def test_grouped_expert_adapters_a_converted_base_and_a_precomputed_init_from_build(tmp_path):
    """Once refused as not supported yet; MindSpeed-RL's refusals are tests/compiler/test_mindspeed_lora.py."""
    experts = plan_recipe(MOE, [*SECTION, "lora.experts=true"])
    assert experts.lora.experts and experts.layout.moe_experts == "npu-gmm"
    _, out = build(TINY, [*SECTION, "checkpoint.init=converted", "checkpoint.load=./a", "checkpoint.ref_model=./b"],
                   out=tmp_path / "converted")
    for path in ("megatron.args", "resume/megatron.args"):
        args = megatron_args.parse([f"@{out / path}"])
        assert (args.dpoc_lora_base, args.ref_model) == ("./a", "./b")
    _, out = build(TINY, [*SECTION, "lora.init_from=./sft", "dpo.reference=precomputed"], out=tmp_path / "pre")
    assert megatron_args.parse([f"@{out / 'megatron.args'}"]).lora_load == "./sft"
    assert (out / "reference.sh").is_file()
    _, plain = build(TINY, [*SECTION], out=tmp_path / "hf")
    assert "--dpoc-lora-base" not in (plain / "megatron.args").read_text()


def test_the_adapters_reach_the_runtime_and_only_with_a_section(tmp_path):
    _, out = build(TINY, [*SECTION, "lora.targets=[q_proj,k_proj,v_proj,o_proj]", "lora.dropout=0.1"],
                   out=tmp_path / "b")
    for path in ("megatron.args", "resume/megatron.args"):
        args = megatron_args.parse([f"@{out / path}"])
        assert (args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules, args.dpoc_lora_experts) \
            == (8, 16.0, 0.1, ("linear_qkv", "linear_proj"), False)
    assert "--lora-target-modules linear_qkv,linear_proj\n" in (out / "megatron.args").read_text()
    assert megatron_args.parse([f"@{out / 'megatron.args'}"]).lora_load is None
    _, plain = build(TINY, [], out=tmp_path / "plain")
    assert "--lora" not in (plain / "megatron.args").read_text()


def test_init_from_reaches_the_runtime_as_lora_load(tmp_path):
    _, out = build(TINY, [*SECTION, "lora.init_from=./sft-adapter"], out=tmp_path / "b")
    for path in ("megatron.args", "resume/megatron.args"):
        assert megatron_args.parse([f"@{out / path}"]).lora_load == "./sft-adapter"
