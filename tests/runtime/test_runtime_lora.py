"""LoRA in the dpoc runtime on CPU (fp32, gloo): every layout gives the one-process loss and every adapter
gradient (lora_probe.py, B set non-zero so that A's gradients are too); the base gets no gradient buffer, no
optimizer state and no update; a fresh adapter's first step is ln 2 against the policy with adapters off; a
checkpoint holds only the adapters and resumes only on its own base."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from megatron.core import dist_checkpointing

from dpoc.common.ports import free_port
from dpoc.contract.lora import MCORE_TARGETS
from tests.runtime import hf_models
from tests.runtime.synthetic import write_args, write_pairs
from tests.runtime.test_device_stubs import ROOT, run_python
from tests.runtime.test_runtime_attention import relative_error
from tests.runtime.test_runtime_train import metrics, train

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


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("lora")
    write_pairs(tmp / "pairs", pairs=16)
    return tmp


def probe(tmp: Path, name: str, processes: int, flags: list, moe: bool) -> dict:
    out = tmp / name
    out.mkdir(exist_ok=True)
    args = write_args(tmp / f"{name}.args", str(tmp / "pairs"), tmp / "runs" / name, layout=flags, moe=moe,
                      distributed_optimizer=False, extra=EXPERTS if moe else LORA)
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", f"--nproc-per-node={processes}",
                                          "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    done = run_python(*launcher, str(ROOT / "tests" / "runtime" / "lora_probe.py"), str(args), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "lora.json").read_text())


@pytest.fixture(scope="module")
def one_process(workdir):
    found: dict[str, dict] = {}

    def get(model: str) -> dict:
        if model not in found:
            found[model] = probe(workdir, f"single-{model}", 1, [], model == "moe")
        return found[model]

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
def test_layout_gives_the_one_process_loss_and_adapter_gradients(workdir, one_process, layout):
    processes, flags, model = LAYOUTS[layout]
    got, expected = probe(workdir, layout, processes, flags, model == "moe"), one_process(model)
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert set(got["grads"]) == set(expected["grads"])
    for key, grad in expected["grads"].items():
        assert any(grad), key  # B is non-zero, so every factor has a gradient to compare
        assert relative_error(grad, got["grads"][key]) < 1e-5, (layout, key)
    for rank in got["ranks"]:
        assert rank["base_with_main_grad"] == [] and rank["base_changed"] == []
        assert rank["optimizer_state_numel"] == 2 * rank["adapter_numel"] == 2 * rank["buffer_numel"]


def _run(tmp: Path, name: str, extra: list, processes: int = 1, **kwargs) -> subprocess.CompletedProcess:
    args = write_args(tmp / f"{name}.args", str(tmp / "pairs"), tmp / "runs" / name,
                      extra=[*LORA, ("--save", str(tmp / "runs" / name / "checkpoints")), *extra], **kwargs)
    return train(args, processes)


@pytest.mark.slow
def test_a_fresh_adapter_starts_at_ln2_and_saves_only_adapters(workdir):
    done = _run(workdir, "fresh", [], steps=3)
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
def test_adapters_train_under_full_recompute(workdir):
    """megatron's reentrant layer checkpoint gives its parameters no gradient when the layer's input has none,
    and the frozen embedding's output had none: the adapters stayed at their start (grad norm 0, loss ln 2)."""
    recompute = [("--recompute-granularity", "full"), ("--recompute-method", "uniform"),
                 ("--recompute-num-layers", 1)]
    done = _run(workdir, "recompute", recompute, steps=2)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = metrics(workdir / "runs" / "recompute")
    assert rows[0]["grad_norm"] > 0 and rows[1]["loss"] != rows[0]["loss"]


@pytest.mark.slow
def test_adapters_resume_only_on_their_own_base(tmp_path):
    write_pairs(tmp_path / "pairs", pairs=16)
    bases = [hf_models.save_model("qwen3", tmp_path / f"base{seed}", seed=seed) for seed in (0, 1)]
    flags = hf_models.model_flags(bases[0])

    def start(base: Path, resume: bool) -> subprocess.CompletedProcess:
        save = tmp_path / "runs" / "hf" / "checkpoints"
        extra = [("--dpoc-hf-weights", str(base)), ("--ref-model", str(base))]
        extra += [("--load", str(save))] if resume else []
        return _run(tmp_path, "hf", extra, steps=2 + 2 * resume, model=flags, init=[("--dpoc-init", "hf")])

    assert start(bases[0], resume=False).returncode == 0
    refused = start(bases[1], resume=True)
    assert refused.returncode == 2
    assert (f"--dpoc-init: the LoRA base is hf {bases[1]}") in refused.stderr
    assert f"holds adapters trained on hf {bases[0]}" in refused.stderr
    assert start(bases[0], resume=True).returncode == 0
    assert [r["step"] for r in metrics(tmp_path / "runs" / "hf")] == [1, 2, 3, 4]

