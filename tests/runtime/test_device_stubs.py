"""The runtime on the npu and cuda stand-ins (device_stubs.py): issue 20's defects 1-4, each checked on its own
(device_stub_probe.py, first in its kind's launch) for a tiny MoE run with grouped GEMM asked for, bf16, as the
guide's job is configured; every shipped recipe's step, and context parallelism on the npu stand-in. One launch
per kind (2 processes) holds all of that kind's runs (`batched.py`; the stand-in is installed once per process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runtime.batched import Runs
from tests.runtime.synthetic import write_args, write_pairs
from tests.runtime.test_runtime_train import COMPARED, metrics

pytestmark = pytest.mark.slow  # every test here reads a launch's output

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = {"npu": "hccl", "cuda": "nccl"}
MEGATRON_FP32_NAME = "torch.cuda.FloatTensor"  # what megatron-core's optimizers and clip_grads accept


def stub_args(tmp: Path, kind: str, moe: bool = True, extra: list[tuple[str, object]] = ()) -> Path:
    if not any(tmp.glob("pairs*")):
        write_pairs(tmp / "pairs", pairs=16)
    flags = [("--dpoc-device", kind), ("--distributed-backend", BACKENDS[kind]), ("--bf16", True),
             *([("--moe-grouped-gemm", True)] if moe else []), *extra]
    return write_args(tmp / f"{kind}.args", str(tmp / "pairs"), tmp / "runs" / kind, moe=moe, extra=flags)


def run_python(*command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def check_args(tmp: Path, kind: str) -> Path:
    """The tiny MoE model with grouped GEMM in bf16 at tp2 (etp2, sequence parallel): the device check's group is
    2 processes."""
    flags = [("--dpoc-device", kind), ("--distributed-backend", BACKENDS[kind]), ("--bf16", True),
             ("--moe-grouped-gemm", True), ("--tensor-model-parallel-size", 2), ("--sequence-parallel", True),
             ("--expert-model-parallel-size", 1), ("--expert-tensor-parallel-size", 2)]
    return write_args(tmp / f"check-{kind}.args", str(tmp / "pairs"), tmp / "runs" / f"check-{kind}", moe=True,
                      extra=flags)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("stubs")
    write_pairs(tmp / "pairs", pairs=16)
    return tmp


@pytest.fixture(scope="module")
def runs(work) -> Runs:
    """Per kind, one 2-process launch: the probe, every shipped recipe's step, (npu) the cp2 run, and the device
    check at tp2; and the cp2 run's one-process CPU reference."""
    runs = Runs(work / "launches")
    for kind in BACKENDS:
        runs.add(f"probe-{kind}", ["-m", "tests.runtime.device_stub_probe", kind, stub_args(work, kind)], 2, kind)
        for recipe in RECIPES:
            args = shrunk_recipe(recipe, kind, work)
            runs.add(f"{recipe}-{kind}", ["-m", "tests.runtime.device_stub_train", kind, f"@{args}"], 2, kind)
    cpu = write_args(work / "cpu.args", str(work / "pairs"), work / "cpu", steps=2)
    npu = write_args(work / "npu-cp2.args", str(work / "pairs"), work / "npu-cp2", steps=2,
                     layout=[("--context-parallel-size", 2)],
                     extra=[("--dpoc-device", "npu"), ("--distributed-backend", "hccl")])
    runs.add("cp2-npu", ["-m", "tests.runtime.device_stub_train", "npu", f"@{npu}"], 2, "npu")
    for kind in BACKENDS:
        (work / f"check-{kind}").mkdir()
        runs.add(f"check-{kind}", ["-m", "tests.runtime.device_stub_preflight", kind, "rank", check_args(work, kind),
                                   work / f"check-{kind}", 2], 2, kind)
    runs.add("cpu", ["-m", "dpoc.runtime.train", f"@{cpu}"])
    return runs


@pytest.fixture(scope="module")
def probe(runs) -> dict[str, list[dict]]:
    """Each kind's checks, as each of the two ranks found them."""
    out = {}
    for kind in BACKENDS:
        done = runs.result(f"probe-{kind}")
        assert done.returncode == 0, done.stderr[-3000:]
        out[kind] = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        assert len(out[kind]) == 2, done.stdout[-3000:]
    return out


def _ok(results: list[dict]):
    """The value every rank found (the same on each), failing with the first rank's error."""
    for result in results:
        assert result["ok"], result["error"]
    assert all(r["value"] == results[0]["value"] for r in results), results
    return results[0]["value"]


@pytest.mark.parametrize("kind", BACKENDS)
def test_seeding_works(probe, kind):
    """defect 2, on npu: IndexError: tuple index out of range (torch.cuda.default_generators)."""
    _ok([rank["seed"] for rank in probe[kind]])


@pytest.mark.parametrize("kind, experts", [("npu", "GroupedExperts[npu-gmm]"),
                                           ("cuda", "GroupedExperts[torch-grouped-mm]")])
def test_moe_experts_run_the_devices_grouped_gemm(probe, kind, experts):
    """defect 1: megatron's GroupedMLP asserted the grouped_gemm package."""
    assert _ok([rank["experts"] for rank in probe[kind]]) == experts


@pytest.mark.parametrize("kind", BACKENDS)
def test_megatron_sees_the_type_names_it_accepts(probe, kind):
    """defect 3, on npu: NPU tensors report torch.npu.FloatTensor."""
    assert _ok([rank["type_name"] for rank in probe[kind]]) == MEGATRON_FP32_NAME


@pytest.mark.parametrize("kind", BACKENDS)
def test_the_checkpoint_problem_vote_runs_on_the_groups_device(probe, kind):
    """defect 4: No backend type associated with device type cpu."""
    assert _ok([rank["collective"] for rank in probe[kind]]) == []


RECIPES = sorted(p.parent.name for p in (ROOT / "tests" / "golden").glob("*/megatron.args"))
ARCHITECTURE = {"--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
                "--group-query-attention", "--num-query-groups", "--kv-channels", "--max-position-embeddings",
                "--position-embedding-type", "--rotary-base", "--normalization", "--norm-epsilon", "--swiglu",
                "--disable-bias-linear", "--qk-layernorm", "--untie-embeddings-and-output-weights",
                "--padded-vocab-size", "--num-experts", "--moe-router-topk", "--moe-ffn-hidden-size",
                "--moe-aux-loss-coeff", "--moe-token-dispatcher-type"}
# what a tiny run on this machine cannot take from a shipped recipe: its files, its size, and its device's kernels
# (--dpoc-moe-experts: without it the stand-in's device picks its own grouped GEMM for --moe-grouped-gemm)
PLACES = {"--dpoc-moe-experts", "--data-path", "--tokenizer-type", "--tokenizer-name-or-path", "--save", "--save-interval", "--load",
          "--dpoc-keep-checkpoints", "--dpoc-init", "--dpoc-hf-weights", "--ref-model", "--dpoc-run-dir",
          "--dpoc-device", "--distributed-backend", "--micro-batch-size", "--global-batch-size", "--seq-length",
          "--train-iters", "--lr-warmup-iters", "--lr-decay-iters", "--tensorboard-dir", "--num-layer-list", "--num-layers-per-virtual-pipeline-stage",
          "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--expert-model-parallel-size",
          "--expert-tensor-parallel-size", "--sequence-parallel", "--dpoc-plan-hash"}


def shrunk_recipe(name: str, kind: str, tmp: Path) -> Path:
    """A shipped recipe's megatron.args (its golden build) at tiny dimensions on 2 processes: every flag kept
    but the architecture (synthetic.model_flags), the files, and the layout (tp at most 2, etp at most tp)."""
    from dpoc.contract.megatron_args import format_args
    from tests.runtime.synthetic import model_flags

    flags: dict[str, object] = {}
    for line in (ROOT / "tests" / "golden" / name / "megatron.args").read_text().splitlines():
        flag, _, value = line.partition(" ")
        flags[flag] = value or True
    tp = min(int(flags["--tensor-model-parallel-size"]), 2)
    etp = min(int(flags.get("--expert-tensor-parallel-size", 1)), tp)
    kept = [(f, v) for f, v in flags.items() if f not in ARCHITECTURE | PLACES]
    path = tmp / f"{name}-{kind}.args"
    path.write_text(format_args([
        *model_flags(moe="--num-experts" in flags, layers=2), *kept,
        ("--tensor-model-parallel-size", tp), ("--expert-tensor-parallel-size", etp),
        *([("--sequence-parallel", True)] if tp > 1 else []),
        ("--dpoc-device", kind), ("--distributed-backend", BACKENDS[kind]), ("--micro-batch-size", 2),
        ("--global-batch-size", 4 // tp), ("--seq-length", 64), ("--train-iters", 1),
        ("--data-path", str(tmp / "pairs")), ("--dpoc-init", "random"), ("--dpoc-run-dir", str(tmp / name / kind))]))
    return path


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_shipped_recipe_builds_and_steps(work, runs, recipe, kind):
    """The full model and one optimizer step of each shipped recipe (tiny, 2 processes) on the stand-in."""
    tmp, args = work, work / f"{recipe}-{kind}.args"
    done = runs.result(f"{recipe}-{kind}")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp / recipe / kind / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1] and lines[0]["grad_norm"] > 0
    log = (tmp / recipe / kind / "train.log").read_text()
    assert f"2 processes on {kind}" in log
    flags = args.read_text()
    grouped = {"npu": "npu-gmm", "cuda": "torch-grouped-mm"}[kind] if "--moe-grouped-gemm" in flags else "sequential"
    experts = grouped if "--num-experts" in flags else "-"
    assert f"kernels: attention {'npu-fusion' if kind == 'npu' else 'sdpa'}, moe experts {experts}" in log


CHECKED = {  # the kernels the check must name on each stand-in (tp2 etp2: the layer's group is 2 processes)
    "npu": ["collective all_reduce (hccl)", "RMSNorm (torch_npu.npu_rms_norm)", "rotary (torch_npu.npu_rotary_mul)",
            "swiglu (torch_npu.npu_swiglu)", "attention (npu-fusion)", "moe experts (npu-gmm)",
            "one layer forward, backward and optimizer step (experts npu-gmm, tp2 ep1 etp2, 2 processes)",
            "replicas agree (tp2 ep1 etp2, 2 processes)"],
    "cuda": ["collective all_reduce (nccl)", "RMSNorm (unfused)", "rotary (unfused)", "swiglu (unfused)",
             "attention (sdpa)", "moe experts (torch-grouped-mm)",
             "one layer forward, backward and optimizer step (experts torch-grouped-mm, tp2 ep1 etp2, 2 processes)",
             "replicas agree (tp2 ep1 etp2, 2 processes)"],
}


@pytest.mark.parametrize("kind", BACKENDS)
def test_the_device_check_runs_at_tp2_on_the_stand_in(work, runs, kind):
    """The device check as two processes of its group, each with the stand-in: every kernel path at the rank's
    tp2 shapes, the sharded layer's step on hccl / nccl (host tensors refused), and the two ranks' replicas
    alike."""
    from dpoc.contract.check_group import read_report

    done = runs.result(f"check-{kind}")
    assert done.returncode == 0, done.stderr[-3000:]
    lines, failure = read_report(work / f"check-{kind}")
    assert failure is None and lines is not None, (failure, done.stderr[-3000:])
    assert [line.removeprefix("device check: ").split(": ok")[0] for line in lines] == CHECKED[kind], lines


def test_context_parallel_on_the_npu_stand_in_gives_the_one_process_cpu_losses(work, runs):
    """cp2 through npu_fusion_attention (its documented semantics, npu_kernels.py) and the hccl stand-in, fp32,
    against one CPU process: every metric of 2 steps within 1e-5."""
    assert runs.result("cpu").returncode == 0
    done = runs.result("cp2-npu")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernels: attention npu-fusion" in (work / "npu-cp2" / "train.log").read_text()
    expected, got = metrics(work / "cpu"), metrics(work / "npu-cp2")
    assert [r["step"] for r in got] == [1, 2]
    for mine, theirs in zip(got, expected, strict=True):
        for key in COMPARED:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (mine["step"], key)
