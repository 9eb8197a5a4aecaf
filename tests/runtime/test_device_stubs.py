"""The runtime on the npu and cuda stand-ins (device_stubs.py): issue 20's defects 1-4, each checked on its own
in a fresh process (device_stub_probe.py) for a tiny MoE run with grouped GEMM asked for, bf16, as the guide's
job is configured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runtime.synthetic import write_args, write_pairs

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


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("stubs")
    out = {}
    for kind in BACKENDS:
        done = run_python(str(Path(__file__).with_name("device_stub_probe.py")), kind, str(stub_args(tmp, kind)))
        assert done.returncode == 0, done.stderr[-3000:]
        out[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def _ok(result: dict):
    assert result["ok"], result["error"]
    return result["value"]


@pytest.mark.parametrize("kind", BACKENDS)
def test_seeding_works(probe, kind):
    """defect 2, on npu: IndexError: tuple index out of range (torch.cuda.default_generators)."""
    _ok(probe[kind]["seed"])


@pytest.mark.parametrize("kind, experts", [("npu", "GroupedExperts[npu-gmm]"),
                                           ("cuda", "GroupedExperts[torch-grouped-mm]")])
def test_moe_experts_run_the_devices_grouped_gemm(probe, kind, experts):
    """defect 1: megatron's GroupedMLP asserted the grouped_gemm package."""
    assert _ok(probe[kind]["experts"]) == experts


@pytest.mark.parametrize("kind", BACKENDS)
def test_megatron_sees_the_type_names_it_accepts(probe, kind):
    """defect 3, on npu: NPU tensors report torch.npu.FloatTensor."""
    assert _ok(probe[kind]["type_name"]) == MEGATRON_FP32_NAME


@pytest.mark.parametrize("kind", BACKENDS)
def test_the_checkpoint_problem_vote_runs_on_the_groups_device(probe, kind):
    """defect 4: No backend type associated with device type cpu."""
    assert _ok(probe[kind]["collective"]) == []


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
    if not any(tmp.glob("pairs*")):
        write_pairs(tmp / "pairs", pairs=16)
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
def test_every_shipped_recipe_builds_and_steps(tmp_path_factory, recipe, kind):
    """The full model and one optimizer step of each shipped recipe (tiny, 2 processes) on the stand-in."""
    from dpoc.common.ports import free_port

    tmp = tmp_path_factory.getbasetemp() / "recipes"
    tmp.mkdir(exist_ok=True)
    args = shrunk_recipe(recipe, kind, tmp)
    done = run_python("-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                      f"--master-port={free_port()}", str(Path(__file__).with_name("device_stub_train.py")),
                      kind, f"@{args}")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp / recipe / kind / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1] and lines[0]["grad_norm"] > 0
    log = (tmp / recipe / kind / "train.log").read_text()
    assert f"2 processes on {kind}" in log
    flags = args.read_text()
    grouped = {"npu": "npu-gmm", "cuda": "torch-grouped-mm"}[kind] if "--moe-grouped-gemm" in flags else "sequential"
    experts = grouped if "--num-experts" in flags else "-"
    assert f"kernels: attention {'npu-fusion' if kind == 'npu' else 'sdpa'}, moe experts {experts}" in log


@pytest.mark.slow
def test_context_parallel_on_the_npu_stand_in_gives_the_one_process_cpu_losses(tmp_path):
    """cp2 through npu_fusion_attention (its documented semantics, npu_kernels.py) and the hccl stand-in, fp32,
    against one CPU process: every metric of 2 steps within 1e-5."""
    from dpoc.common.ports import free_port
    from tests.runtime.test_runtime_train import COMPARED, metrics

    data = write_pairs(tmp_path / "pairs", pairs=16)
    cpu = write_args(tmp_path / "cpu.args", data, tmp_path / "cpu", steps=2)
    npu = write_args(tmp_path / "npu.args", data, tmp_path / "npu", steps=2, layout=[("--context-parallel-size", 2)],
                     extra=[("--dpoc-device", "npu"), ("--distributed-backend", "hccl")])
    assert run_python("-m", "dpoc.runtime.train", f"@{cpu}").returncode == 0
    done = run_python("-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                      f"--master-port={free_port()}", str(Path(__file__).with_name("device_stub_train.py")), "npu",
                      f"@{npu}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernels: attention npu-fusion" in (tmp_path / "npu" / "train.log").read_text()
    expected, got = metrics(tmp_path / "cpu"), metrics(tmp_path / "npu")
    assert [r["step"] for r in got] == [1, 2]
    for mine, theirs in zip(got, expected, strict=True):
        for key in COMPARED:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (mine["step"], key)
