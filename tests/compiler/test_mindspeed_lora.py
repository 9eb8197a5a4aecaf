"""LoRA on the MindSpeed-RL target: the MegatronConfig keys MindSpeed-LLM's LoRA reads, its merge on the way
back to Hugging Face, and a refusal (with the reason and runtime=dpoc) for what it cannot express."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from dpoc.compiler.pipeline import build, plan_recipe
from dpoc.compiler.render.targets import mindspeed_lora
from dpoc.contract.errors import DpocError
from tests.compiler.test_build import MINDSPEED_FIELDS
from tests.conftest import RECIPES

MOE = RECIPES / "qwen3_30b.yaml"
EXPRESSIBLE = ["runtime=mindspeed-rl", "lora.rank=8", "lora.alpha=16", "lora.targets=[q_proj,k_proj,v_proj]",
               "parallelism.moe_dispatcher=alltoall_seq"]


def _problems(overrides) -> list[str]:
    with pytest.raises(DpocError) as exc:
        plan_recipe(MOE, overrides)
    return [f"{p.where}: {p.message}" for p in exc.value.problems]


def test_lora_renders_megatron_config_scalars_and_the_merging_conversion(tmp_path):
    build(MOE, EXPRESSIBLE, out=tmp_path / "q")
    for name in ("dpo_q.yaml", "dpo_q_resume.yaml"):
        train = yaml.safe_load((tmp_path / "q/mindspeed-rl" / name).read_text())["megatron_training"]
        assert set(train) - {"model"} <= MINDSPEED_FIELDS
        assert {k: v for k, v in train.items() if k.startswith("lora")} == {
            "lora_r": 8, "lora_alpha": 16, "lora_target_modules": "linear_qkv", "lora_fusion": True}
    to_hf = (tmp_path / "q/mindspeed-rl/convert/mcore_to_hf.sh").read_text()
    assert "  --lora-r 8 \\\n  --lora-alpha 16 \\\n  --lora-target-modules linear_qkv \\\n" in to_hf
    assert "--lora" not in (tmp_path / "q/mindspeed-rl/convert/hf_to_mcore.sh").read_text()
    # CCLoRA overlaps the adapters with tensor-parallel communication: nothing to overlap at tp 1
    build(MOE, [*EXPRESSIBLE, "parallelism.tp=1", "parallelism.etp=1", "parallelism.pp=16"], out=tmp_path / "t1")
    train = yaml.safe_load((tmp_path / "t1/mindspeed-rl/dpo_t1.yaml").read_text())["megatron_training"]
    assert train["lora_target_modules"] == "linear_qkv" and "lora_fusion" not in train


def test_what_mindspeed_cannot_express_is_refused_with_the_reason():
    got = _problems(["runtime=mindspeed-rl", "lora.rank=8", "lora.alpha=12.5", "lora.dropout=0.1"])
    assert got == [
        "lora.targets: linear_qkv, linear_proj: MindSpeed-RL passes a list to MindSpeed-LLM as one broken argument "
        "(\"['linear_qkv', ...]\"), so its lora_target_modules can hold one linear; valid: one of them, or "
        "runtime=dpoc",
        "lora.alpha: 12.5: MindSpeed-LLM parses --lora-alpha as an integer; valid: an integer, or runtime=dpoc",
        "lora.dropout: 0.1: MindSpeed-LLM's LoRA has no dropout (fixed at 0); valid: 0, or runtime=dpoc",
        "parallelism.moe_dispatcher: alltoall: MindSpeed-LLM's LoRA on a MoE model needs alltoall_seq; valid: "
        "alltoall_seq, or runtime=dpoc"]
    assert "parallelism.moe_tp_extend_ep: true: MindSpeed-LLM's LoRA refuses it; valid: false, or runtime=dpoc" in \
        _problems([*EXPRESSIBLE, "parallelism.moe_tp_extend_ep=true"])


def test_a_peft_adapter_to_start_from_is_refused():
    plan = plan_recipe(MOE, EXPRESSIBLE)
    plan = dataclasses.replace(plan, lora=dataclasses.replace(plan.lora, init_from="./sft-adapter"))
    assert [f"{v.field}: {v.message}" for v in mindspeed_lora.unsupported(plan)] == [
        "lora.init_from: MindSpeed-LLM loads its own per-rank LoRA checkpoints, not a PEFT adapter directory; "
        "valid: leave it out, or runtime=dpoc"]


def test_its_estimate_holds_the_reference_mindspeed_builds_as_a_second_model():
    """MindSpeed-LLM's DPO loads the reference as a model of its own, so its LoRA estimate keeps that copy;
    beside it, the same layout training every parameter."""
    plan = plan_recipe(MOE, EXPRESSIBLE)
    peak = plan.estimate["memory"]["stages"][0]
    assert peak["reference_gib"] == pytest.approx(peak["weights_gib"], rel=1e-3)
    assert peak["gradients_gib"] < 0.01 * peak["weights_gib"]
    full = plan.estimate["full_parameter"]
    assert full["static_gib"] > 3 * (peak["weights_gib"] + peak["reference_gib"])
