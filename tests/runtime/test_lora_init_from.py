"""`lora.init_from` (--lora-load) in the dpoc runtime: a PEFT adapter written by PEFT itself on the tiny HF base
(non-zero A and B) starts the policy, and the reference is the base plus that adapter, frozen: the first step's
loss is ln 2 and its policy log-probs are those of PEFT's merged model on the same tokens. With another model as
`--ref-model`, the first step's metrics are a float64 computation with the merged model as the policy, from the
HF base and from it converted (whose resume then finds the base through --dpoc-lora-base); a precomputed
reference is the base with that adapter too."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

from dpoc.contract.lora import HF_TO_MCORE
from tests.runtime import hf_models
from tests.runtime.batched import Runs
from tests.runtime.synthetic import write_args, write_pairs
from tests.runtime.test_runtime_convert import dpo_first_step, read_pairs, sequence_logp
from tests.runtime.test_runtime_train import metrics

DPO = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def peft_adapter(base, out) -> None:
    """A PEFT LoRA adapter on every linear dpoc adapts, with A and B both drawn (init_lora_weights=False). The
    linears megatron-core fuses then share A (k, v take q's; up takes gate's), which rank 4 holds exactly (PEFT's
    independent A's would need the stacked rank and are refused: tests/runtime/test_peft_format.py)."""
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(HF_TO_MCORE), init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for layer in peft_model.base_model.model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for shared, others in ((attn.q_proj, (attn.k_proj, attn.v_proj)), (mlp.gate_proj, (mlp.up_proj,))):
                for other in others:
                    other.lora_A["default"].weight.copy_(shared.lora_A["default"].weight)
    peft_model.save_pretrained(out)


def _lora_args(tmp: Path, name: str, reference: Path, steps: int = 1, extra: list = (), run: str | None = None,
               init: list | None = None) -> Path:
    """A LoRA run on tmp/base (`init`: where the policy starts, default the HF base) from the PEFT adapter
    tmp/adapter, against `reference` (its run directory runs/`run`, default `name`)."""
    base = tmp / "base"
    start = init if init is not None else [("--dpoc-init", "hf"), ("--dpoc-hf-weights", str(base))]
    return write_args(tmp / f"{name}.args", str(tmp / "pairs"), tmp / "runs" / (run or name), steps=steps,
                      global_batch=8, micro_batch=2, lr=2e-2, model=hf_models.model_flags(base),
                      init=[*start, ("--ref-model", str(reference))],
                      extra=[("--lora-r", 4), ("--lora-alpha", 8.0), ("--lora-load", str(tmp / "adapter")), *extra])


SAVE = [("--save", "ckpt"), ("--save-interval", 2)]
PRECOMPUTED = [("--dpoc-reference", "precomputed"), ("--dpoc-reference-micro-batch-size", 4)]


def _converted(work: Path, resume: bool) -> list:
    """The policy from the converted base (tmp/converted, `dpoc convert hf-to-mcore` of tmp/base); a resume
    loads tmp/ckpt-converted and finds the base through --dpoc-lora-base alone (--ref-model is the other model)."""
    start = [("--load", work / "ckpt-converted")] if resume else \
        [("--load", work / "converted"), ("--finetune", True), ("--no-load-optim", True), ("--no-load-rng", True)]
    return [("--dpoc-init", "converted"), *start, ("--dpoc-lora-base", work / "converted")]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The tiny HF base (seed 0), another model (seed 1) and the PEFT adapter on the base, the dataset."""
    tmp = tmp_path_factory.mktemp("init-from")
    base = hf_models.save_model("qwen3", tmp / "base")
    hf_models.save_model("qwen3", tmp / "other", seed=1)
    peft_adapter(base, tmp / "adapter")
    write_pairs(tmp / "pairs", pairs=8, seed=5)
    return tmp


@pytest.fixture(scope="module")
def runs(work) -> Runs:
    """Every run of this module, one launch per process count: against the base itself (one step) and against the
    other model (three), three steps, the first step at tp2, two steps saved then resumed to three; the precompute
    pass and a precomputed step; the base converted, and on it against the other model two steps saved, then
    resumed to three."""
    runs = Runs(work / "launches")
    save = [(flag, work / value if flag == "--save" else value) for flag, value in SAVE]
    converted_save = [("--save", work / "ckpt-converted"), ("--save-interval", 2)]
    for name, reference, kwargs in (
            ("lora", "base", {}), ("other-reference", "other", dict(steps=3)), ("whole", "base", dict(steps=3)),
            ("tp2", "base", dict(extra=[("--tensor-model-parallel-size", 2)])),
            ("split", "base", dict(steps=2, extra=save)),
            ("split-resumed", "base", dict(steps=3, extra=[*save, ("--load", work / "ckpt")], run="split")),
            ("pass", "base", dict(extra=PRECOMPUTED)), ("precomputed", "base", dict(extra=PRECOMPUTED)),
            ("converted", "other", dict(steps=2, extra=converted_save, init=_converted(work, False))),
            ("converted-resumed", "other", dict(steps=3, extra=converted_save, init=_converted(work, True),
                                                run="converted"))):
        if name == "converted":
            runs.add("convert", ["-m", "dpoc.cli", "convert", "hf-to-mcore", work / "base", work / "converted"])
        module = "dpoc.runtime.precompute" if name == "pass" else "dpoc.runtime.train"
        runs.add(name, ["-m", module, f"@{_lora_args(work, name, work / reference, **kwargs)}"],
                 2 if name == "tp2" else 1)
    return runs


def lora_run(work: Path, runs: Runs, name: str) -> list[dict[str, float]]:
    """A declared run's metrics, step by step (of its run directory, so a resume's are its start's too)."""
    done = runs.result(name)
    assert done.returncode == 0, done.stderr[-3000:]
    return metrics(work / "runs" / name.removesuffix("-resumed"))


@pytest.mark.slow
def test_init_from_starts_at_ln2_with_the_merged_models_log_probs(work, runs):
    base = work / "base"
    first = lora_run(work, runs, "lora")[0]
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-6) and first["rewards/margins"] == 0.0

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, work / "adapter").merge_and_unload().eval()
    plain = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    data = read_pairs(work / "pairs")
    for side in ("chosen", "rejected"):
        got = sum(sequence_logp(merged, p[f"{side}_input_ids"], p[f"{side}_labels"]) for p in data) / len(data)
        without = sum(sequence_logp(plain, p[f"{side}_input_ids"], p[f"{side}_labels"]) for p in data) / len(data)
        assert got == pytest.approx(first[f"logps/{side}"], rel=1e-5, abs=1e-6), side
        assert abs(without - got) > 1e-3  # the adapter moves the log-probs: the test sees whether it was loaded


@pytest.fixture(scope="module")
def merged_first_step(work) -> dict[str, float]:
    """The first step's metrics in float64: PEFT's merged model as the policy, the other model as the reference."""
    model = transformers.AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float64)
    policy = PeftModel.from_pretrained(model, work / "adapter").double().merge_and_unload().eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(work / "other", dtype=torch.float64).eval()
    return dpo_first_step(policy, reference, read_pairs(work / "pairs"))


@pytest.mark.parametrize("run", ["other-reference", "converted"])
@pytest.mark.slow
def test_init_from_against_another_reference_is_the_float64_merged_policy(work, runs, merged_first_step, run):
    """From the HF base, and from it converted (the other model loaded beside the LoRA policy)."""
    got = lora_run(work, runs, run)[0]
    assert got["rewards/margins"] != 0
    for key, value in merged_first_step.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_a_converted_base_beside_another_reference_resumes_on_the_base(work, runs):
    """The resume's --load is the save directory and --ref-model the other model: the frozen base comes from
    --dpoc-lora-base, so step 3 is the HF-started run's step 3 (on the other model as base it would not be)."""
    resumed = lora_run(work, runs, "converted-resumed")
    assert f"resumed from {work}/ckpt-converted/iter_0000002: iteration 2" in \
        (work / "runs" / "converted" / "train.log").read_text()
    hf_started = lora_run(work, runs, "other-reference")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for key in DPO:
        assert resumed[2][key] == pytest.approx(hf_started[2][key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_a_precomputed_reference_is_the_base_with_the_initial_adapter(work, runs):
    """The pass runs the reference as training defines it: the precomputed first step is the live one (ln 2)."""
    done = runs.result("pass")
    assert done.returncode == 0, done.stderr[-3000:]
    (table,) = work.glob("pairs_reference-*.npz")
    with np.load(table) as data:
        assert json.loads(str(data["identity"]))["reference"]["source"] == f"hf {work / 'base'} + lora {work / 'adapter'}"
    live, precomputed = lora_run(work, runs, "lora")[0], lora_run(work, runs, "precomputed")[0]
    assert f"precomputed log-probs: {table}" in (work / "runs" / "precomputed" / "train.log").read_text()
    for key in DPO:
        assert precomputed[key] == pytest.approx(live[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_init_from_at_tp2_and_resumed_is_the_one_process_run(work, runs):
    """Each tp rank loads its shard of the adapter; a resume continues from the trained adapters (the checkpoint),
    not from init_from, while the reference stays the initial adapter."""
    whole = lora_run(work, runs, "whole")
    tp2 = lora_run(work, runs, "tp2")[0]
    for key in DPO:
        assert tp2[key] == pytest.approx(whole[0][key], rel=1e-5, abs=1e-6), key
    lora_run(work, runs, "split")
    resumed = lora_run(work, runs, "split-resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3] and whole[2]["rewards/margins"] != 0
    assert {k: resumed[2][k] for k in DPO} == {k: whole[2][k] for k in DPO}
