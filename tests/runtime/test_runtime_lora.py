"""LoRA in the dpoc runtime on CPU (fp32, gloo): every layout gives the one-process loss and every adapter
gradient (lora_probe.py, B set non-zero so that A's gradients are too); the base gets no gradient buffer, no
optimizer state and no update; a fresh adapter's first step is ln 2 against the policy with adapters off; a
checkpoint holds only the adapters and resumes only on its own base."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from megatron.core import dist_checkpointing

from dpoc.contract.lora import MCORE_TARGETS, Lora
from dpoc.runtime.model import lora
from tests.runtime import hf_models, synthetic
from tests.runtime.batched import Runs
from tests.runtime.synthetic import write_args, write_pairs
from tests.runtime.test_runtime_attention import relative_error
from tests.runtime.test_runtime_train import metrics

LORA = [("--lora-r", 4), ("--lora-alpha", 8.0)]
EXPERTS = [*LORA, ("--dpoc-lora-experts", True), ("--moe-aux-loss-coeff", 0.0)]
LAYOUTS = {  # name: (processes, layout flags, one-process run it equals)
    "tp2": (2, [("--tensor-model-parallel-size", 2)], "dense"),
    "tp2-sp": (2, [("--tensor-model-parallel-size", 2), ("--sequence-parallel", True)], "dense"),
    "pp2": (2, [("--pipeline-model-parallel-size", 2)], "dense"),
    "pp2-vpp2": (2, [("--pipeline-model-parallel-size", 2), ("--num-layers-per-virtual-pipeline-stage", 1)],
                 "dense"),
    "dp2": (2, [], "dense"),
    "ep2-experts": (2, [("--expert-model-parallel-size", 2)], "moe"),
    "tp2-etp2-sp-experts": (2, [("--tensor-model-parallel-size", 2), ("--expert-tensor-parallel-size", 2),
                                ("--sequence-parallel", True)], "moe"),
}


RECOMPUTE = [("--recompute-granularity", "full"), ("--recompute-method", "uniform"), ("--recompute-num-layers", 1)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("lora")
    write_pairs(tmp / "pairs", pairs=16)
    return tmp


def _probe(runs: Runs, tmp: Path, name: str, processes: int, flags: list, moe: bool) -> None:
    args = write_args(tmp / f"{name}.args", str(tmp / "pairs"), tmp / "runs" / name, layout=flags, moe=moe,
                      distributed_optimizer=False, extra=EXPERTS if moe else LORA)
    runs.add(name, ["-m", "tests.runtime.lora_probe", args, tmp / "probes" / name], processes)


def _train(runs: Runs, tmp: Path, name: str, extra: list, processes: int = 1, run: str | None = None,
           **kwargs) -> None:
    """A LoRA training run `name` (its run directory runs/`run`, default `name`), saving to its checkpoints/."""
    run_dir = tmp / "runs" / (run or name)
    args = write_args(tmp / f"{name}.args", str(tmp / "pairs"), run_dir,
                      extra=[*LORA, ("--save", str(run_dir / "checkpoints")), *extra], **kwargs)
    runs.add(name, ["-m", "dpoc.runtime.train", f"@{args}"], processes)


@pytest.fixture(scope="module")
def bases(workdir) -> list[Path]:
    """Two tiny HF Qwen3 bases (seeds 0 and 1)."""
    return [hf_models.save_model("qwen3", workdir / f"base{seed}", seed=seed) for seed in (0, 1)]


@pytest.fixture(scope="module")
def runs(workdir, bases) -> Runs:
    """Every launch of this module, one per process count: the probes in one process (dense, MoE) and at each
    layout; a fresh adapter's run, one under full recompute, and on an HF base: a start, a resume on another
    base (refused), and one on its own (in that order)."""
    runs = Runs(workdir / "launches")
    for model in ("dense", "moe"):
        (workdir / "probes" / f"single-{model}").mkdir(parents=True)
        _probe(runs, workdir, f"single-{model}", 1, [], model == "moe")
    for layout, (processes, flags, model) in LAYOUTS.items():
        (workdir / "probes" / layout).mkdir(parents=True)
        _probe(runs, workdir, layout, processes, flags, model == "moe")
    _train(runs, workdir, "fresh", [], steps=3)
    _train(runs, workdir, "recompute", RECOMPUTE, steps=2)
    flags = hf_models.model_flags(bases[0])
    for name, base, resume in (("hf-start", bases[0], False), ("hf-other-base", bases[1], True),
                               ("hf-resume", bases[0], True)):
        load = [("--load", str(workdir / "runs" / "hf" / "checkpoints"))] if resume else []
        _train(runs, workdir, name, [("--dpoc-hf-weights", str(base)), ("--ref-model", str(base)), *load], run="hf",
               steps=2 + 2 * resume, model=flags, init=[("--dpoc-init", "hf")])
    return runs


def probe(runs: Runs, tmp: Path, name: str) -> dict:
    done = runs.result(name)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((tmp / "probes" / name / "lora.json").read_text())


@pytest.fixture(scope="module")
def one_process(workdir, runs):
    def get(model: str) -> dict:
        return probe(runs, workdir, f"single-{model}")

    return get


@pytest.mark.slow
def test_only_the_adapters_train(one_process):
    got = one_process("dense")
    assert got["shared_reference"]  # the reference is the same chunks with the adapters off: no second model
    layers = 4
    assert len(got["adapter_names"]) == 2 * len(MCORE_TARGETS) * layers
    assert all(name.endswith(("lora_A", "lora_B")) for name in got["adapter_names"])
    assert got["base_with_main_grad"] == [] and got["base_changed"] == []
    assert got["buffer_numel"] == got["adapter_numel"]  # DDP's gradient buffer holds the adapters only
    assert got["optimizer_state_numel"] == 2 * got["adapter_numel"]  # Adam's two moments, adapters only
    hidden, ffn, qkv, r = 64, 128, 4 * 16 + 2 * 2 * 16, 4
    per_layer = r * (hidden + qkv) + r * (4 * 16 + hidden) + r * (hidden + 2 * ffn) + r * (ffn + hidden)
    assert got["adapter_numel"] == layers * per_layer


@pytest.mark.slow
def test_experts_get_one_adapter_each_and_the_router_none(one_process):
    names = one_process("moe")["adapter_names"]
    experts = [n for n in names if "local_experts" in n]
    assert len(experts) == 4 * 4 * 2 * 2  # layers x experts x (fc1, fc2) x (A, B)
    assert not [n for n in names if "router" in n]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.slow
def test_layout_gives_the_one_process_loss_and_adapter_gradients(workdir, runs, one_process, layout):
    got, expected = probe(runs, workdir, layout), one_process(LAYOUTS[layout][2])
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert set(got["grads"]) == set(expected["grads"])
    for key, grad in expected["grads"].items():
        assert any(grad), key  # B is non-zero, so every factor has a gradient to compare
        assert relative_error(grad, got["grads"][key]) < 1e-5, (layout, key)
    for rank in got["ranks"]:
        assert rank["base_with_main_grad"] == [] and rank["base_changed"] == []
        assert rank["optimizer_state_numel"] == 2 * rank["adapter_numel"] == 2 * rank["buffer_numel"]


@pytest.mark.slow
def test_a_fresh_adapter_starts_at_ln2_and_saves_only_adapters(workdir, runs):
    done = runs.result("fresh")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(workdir / "runs" / "fresh")
    assert rows[0]["loss"] == pytest.approx(math.log(2), rel=1e-6) and rows[0]["rewards/margins"] == 0.0
    assert rows[-1]["loss"] != rows[0]["loss"]  # the adapters moved the policy off the reference
    folder = workdir / "runs" / "fresh" / "checkpoints" / "iter_0000003"
    keys = dist_checkpointing.load_tensors_metadata(str(folder))
    model = [k for k in keys if not k.startswith("optimizer")]
    assert model and all("lora_" in k for k in model)
    record = json.loads((folder / "dpoc_checkpoint.json").read_text())["lora"]
    assert {k: record[k] for k in ("rank", "alpha", "dropout", "targets", "experts")} == {
        "rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": list(MCORE_TARGETS), "experts": False}
    assert record["base"]["source"] == "seeded-init:seed=1234"
    log = (workdir / "runs" / "fresh" / "train.log").read_text()
    assert "reference from the policy with its adapters off (the frozen base)" in log


@pytest.mark.slow
def test_adapters_train_under_full_recompute(workdir, runs):
    """megatron's reentrant layer checkpoint gives its parameters no gradient when the layer's input has none,
    and the frozen embedding's output had none: the adapters stayed at their start (grad norm 0, loss ln 2)."""
    done = runs.result("recompute")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(workdir / "runs" / "recompute")
    assert rows[0]["grad_norm"] > 0 and rows[1]["loss"] != rows[0]["loss"]


@pytest.mark.slow
def test_adapters_resume_only_on_their_own_base(workdir, runs, bases):
    assert runs.result("hf-start").returncode == 0
    refused = runs.result("hf-other-base")
    assert refused.returncode == 2
    assert (f"--dpoc-init: the LoRA base is hf {bases[1]}") in refused.stderr
    assert f"holds adapters trained on hf {bases[0]}" in refused.stderr
    assert runs.result("hf-resume").returncode == 0
    assert [r["step"] for r in metrics(workdir / "runs" / "hf")] == [1, 2, 3, 4]


def test_adapter_dropout_is_peft_s_on_the_same_mask():
    """dpoc drops the adapter's input only, as PEFT's LoRA Linear does (result = base(x) + B·A·dropout(x) ·
    scaling): from the same generator state (the same mask) a column-parallel linear gives PEFT's output, in
    training and (no dropout) in eval mode."""
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear

    settings = Lora(rank=2, alpha=4.0, dropout=0.5, targets=("linear_qkv",), experts=False, init_from=None)
    with synthetic.one_process(0):
        config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True)
        ours = ColumnParallelLinear(8, 6, config=config, init_method=torch.nn.init.normal_, bias=False,
                                    gather_output=False)
        lora._adapt(ours, settings, swiglu=False)
        base = torch.nn.Linear(8, 6, bias=False)
        theirs = Linear(base, "default", LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5), r=2, lora_alpha=4,
                        lora_dropout=0.5)
        with torch.no_grad():
            ours.lora_A.normal_()
            ours.lora_B.normal_()
            base.weight.copy_(ours.weight)
            theirs.lora_A["default"].weight.copy_(ours.lora_A)
            theirs.lora_B["default"].weight.copy_(ours.lora_B)
        x = torch.randn(5, 3, 8)
        outputs = {}
        for training in (True, False):
            ours.train(training)
            theirs.train(training)
            torch.manual_seed(7)
            outputs[training] = ours(x)[0]
            torch.manual_seed(7)
            torch.testing.assert_close(outputs[training], theirs(x), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(outputs[True], outputs[False])  # the mask dropped something
