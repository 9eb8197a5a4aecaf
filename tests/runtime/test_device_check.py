"""`dpoc preflight BUILD --device` (dpoc/runtime/device_check.py): on the CPU for the tiny dense recipe at tp2 and
the tiny MoE recipe at ep2 (the CI run: each one two-process torchrun group, run once and shared by the tests
below), and in one process on the npu and cuda stand-ins (device_stubs.py) for the tiny MoE recipe built for
those devices, where it must check each kernel the runtime runs there and, with one stand-in kernel broken
(device_stub_preflight.py), fail in one line naming the op that runs it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dpoc.compiler.pipeline import build
from dpoc.contract.check_group import plan_group, read_report
from dpoc.planner.one_layer import estimate
from tests.conftest import RECIPES, REPO
from tests.runtime.batched import Runs

pytestmark = pytest.mark.slow
# the tiny MoE recipe on each stand-in, with grouped GEMM, at ep1 (one process: the stand-ins live in it); the
# cuda one packs its micro-batches too
BUILDS = {
    "cpu-dense": ("tiny_cpu.yaml", ["parallelism.tp=2"]),
    "cpu-moe": ("tiny_moe_cpu.yaml", []),
    "npu": ("tiny_moe_cpu.yaml", ["hardware.preset=atlas-a2", "hardware.devices_per_node=2",
                                  "parallelism.moe_grouped_gemm=true", "parallelism.ep=1"]),
    "cuda": ("tiny_moe_cpu.yaml", ["hardware.device=cuda", "hardware.backend=nccl", "parallelism.ep=1",
                                   "parallelism.moe_grouped_gemm=true", "training.packing=true"]),
}
LAYER = "one layer forward, backward and optimizer step"
OPS = {  # the ops each build's check names, in order (the kernel in parentheses)
    "cpu-dense": ["collective all_reduce (gloo)", "RMSNorm (unfused)", "rotary (unfused)", "swiglu (unfused)",
                  "attention (sdpa)", f"{LAYER} (experts -, tp2, 2 processes)", "replicas agree (tp2, 2 processes)"],
    "cpu-moe": ["collective all_reduce (gloo)", "RMSNorm (unfused)", "rotary (unfused)", "swiglu (unfused)",
                "attention (sdpa)", f"{LAYER} (experts sequential, tp1 ep2 etp1, 2 processes)",
                "replicas agree (tp1 ep2 etp1, 2 processes)"],
    "npu": ["collective all_reduce (hccl)", "RMSNorm (torch_npu.npu_rms_norm)", "rotary (torch_npu.npu_rotary_mul)",
            "swiglu (torch_npu.npu_swiglu)", "attention (npu-fusion)", "moe experts (npu-gmm)",
            f"{LAYER} (experts npu-gmm, tp1 ep1 etp1, 1 process)"],
    "cuda": ["collective all_reduce (nccl)", "RMSNorm (unfused)", "rotary (unfused)", "swiglu (unfused)",
             "attention (sdpa)", "attention (sdpa, packed)", "moe experts (torch-grouped-mm)",
             f"{LAYER} (experts torch-grouped-mm, tp1 ep1 etp1, 1 process)"],
}
# the layer's line: the step's time and the memory it held (the cpu counts no peak), each beside the planner's
FIGURES = re.compile(r"step (?P<s>[\d.]+)s \(planner (?P<planner_s>[\d.]+)s\), held (?P<held>[\d.]+) MiB "
                     r"\(planner (?P<planner_held>[\d.]+) MiB, [+-]\d+%\), loss (?P<loss>[\d.]+)")


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("device-check")
    out = {}
    for name, (recipe, overrides) in BUILDS.items():
        out[name] = build(RECIPES / recipe, overrides, out=root / name)[1]
    return out


def check(build_dir: Path) -> subprocess.CompletedProcess:
    """The cpu check as the node script runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "dpoc", "preflight", str(build_dir), "--device"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cpu_checks(builds) -> dict[str, subprocess.CompletedProcess]:
    """Each cpu build's check, once: a two-process group each (tp2; ep2)."""
    return {name: check(builds[name]) for name in ("cpu-dense", "cpu-moe")}


def ops_checked(stdout: str) -> list[str]:
    prefix = "device check: "
    return [line.removeprefix(prefix).split(": ok")[0] for line in stdout.splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize("name", ["cpu-dense", "cpu-moe"])
def test_the_cpu_check_runs_every_kernel_path_then_the_sharded_layer(cpu_checks, name):
    done = cpu_checks[name]
    assert done.returncode == 0, done.stderr[-3000:]
    assert ops_checked(done.stdout) == OPS[name]  # rank 0 alone prints: each op once
    assert done.stderr == ""  # the group's own output goes to its log


@pytest.mark.parametrize("name", ["cpu-dense", "cpu-moe"])
def test_the_layer_line_gives_time_and_memory_beside_the_planner(builds, cpu_checks, name):
    """The planner's figures are its estimate of the sharded one-layer job, and the memory the step held is
    within the planner's activation tolerance (bench/memory_vs_measured.py: 15%) of it."""
    layer = next(line for line in cpu_checks[name].stdout.splitlines() if LAYER in line)
    found = FIGURES.search(layer)
    assert found, layer
    plan = json.loads((builds[name] / "plan.json").read_text())
    expected = estimate(plan, plan_group(plan))
    assert float(found["planner_s"]) == pytest.approx(expected.step_s, abs=0.005)
    assert float(found["planner_held"]) == pytest.approx(expected.held_bytes / 2**20, abs=0.05)
    assert float(found["held"]) == pytest.approx(float(found["planner_held"]), rel=0.15), layer
    assert float(found["s"]) > 0 and 0 < float(found["loss"]) < 20


BROKEN = [("npu", "npu_rms_norm", "RMSNorm (torch_npu.npu_rms_norm)"),
          ("npu", "npu_rotary_mul", "rotary (torch_npu.npu_rotary_mul)"),
          ("npu", "npu_swiglu", "swiglu (torch_npu.npu_swiglu)"),
          ("npu", "npu_fusion_attention", "attention (npu-fusion)"),
          ("npu", "npu_grouped_matmul", "moe experts (npu-gmm)"),
          ("cuda", "_grouped_mm", "moe experts (torch-grouped-mm)")]


@pytest.fixture(scope="module")
def stand_in(builds, tmp_path_factory) -> Runs:
    """The stand-in preflights (device_stub_preflight.py), each kind's in one launch: the whole check, then one
    per broken kernel (put back after each)."""
    runs = Runs(tmp_path_factory.mktemp("stand-in") / "launches")
    for kind in ("npu", "cuda"):
        runs.add(kind, ["-m", "tests.runtime.device_stub_preflight", kind, "preflight", builds[kind]], 1, kind)
    for kind, kernel, _ in BROKEN:
        runs.add(kernel, ["-m", "tests.runtime.device_stub_preflight", kind, "preflight", builds[kind], kernel], 1,
                 kind)
    return runs


@pytest.mark.parametrize("name", ["npu", "cuda"])
def test_the_stand_in_check_runs_every_kernel_path_of_the_build(stand_in, name):
    done = stand_in.result(name)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ops_checked(done.stdout) == OPS[name]


@pytest.mark.parametrize("kind, kernel, op", BROKEN)
def test_a_broken_kernel_fails_the_check_naming_its_op(builds, stand_in, kind, kernel, op):
    done = stand_in.result(kernel)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "device check" in line]
    assert errors == [line for line in done.stderr.splitlines() if line.startswith(str(builds[kind]))]
    assert len(errors) == 1 and errors[0].startswith(f"{builds[kind] / 'megatron.args'}: device check {op}: ")
    assert "differs from the CPU float32 result" in errors[0], errors[0]


# rank 1 made to disagree for real (device_check_skew.py), each in its two-process group: one launch for both
SKEWED = {  # how, the build, the op and the tensor the one failure line names
    "norm": ("cpu-dense", "replicas agree (tp2, 2 processes)", "decoder.final_layernorm.weight after the step"),
    "seed": ("cpu-moe", "replicas agree (tp1 ep2 etp1, 2 processes)", "the per-token loss"),
}


@pytest.fixture(scope="module")
def skewed(builds, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    root = tmp_path_factory.mktemp("skewed")
    runs = Runs(root / "launches")
    for how, (name, _, _) in SKEWED.items():
        (root / how).mkdir()
        runs.add(how, ["-m", "tests.runtime.device_check_skew", how, builds[name] / "megatron.args", root / how], 2)
    return {how: (runs.result(how), root / how) for how in SKEWED}


@pytest.mark.parametrize("how", SKEWED)
def test_a_rank_that_disagrees_with_its_peers_fails_naming_the_ranks_and_the_tensor(builds, skewed, how):
    """Every rank's ops match the CPU, but rank 1's replicated weights are not rank 0's: the check's last op
    fails on rank 1, in one line naming rank 0 and the first tensor that differs. norm: tp2, the final norm rank 1
    scaled. seed: ep2, rank 1 seeded apart; on the cpu megatron draws the dense weights from torch's generator
    (the launch's, alike on both), not the seeded tracker, so they still agree, and the per-token loss of the
    micro-batch both ranks ran is what differs."""
    name, op, tensor = SKEWED[how]
    done, report = skewed[how]
    assert done.returncode == 2, done.stderr[-3000:]
    lines, failure = read_report(report)
    assert lines is not None  # rank 0 agrees with itself: the first rank that differs reports
    assert re.fullmatch(rf"{re.escape(str(builds[name] / 'megatron.args'))}: device check {re.escape(op)} on rank 1: "
                        rf"{re.escape(tensor)} differs from rank 0's: max error [\d.e+-]+ of the largest value "
                        r"\(tolerance 0.0001 in float32\) \(skip the check: DPOC_DEVICE_CHECK=0\)", str(failure)), \
        str(failure)


def test_a_process_reports_its_failure_for_the_launcher(builds, tmp_path, monkeypatch):
    """One process of the MoE build's group (ep2: two processes) started alone: it writes its one problem line
    where the launcher reads it, and exits 2."""
    from dpoc.contract.check_group import REPORT_ENV, read_report
    from dpoc.runtime import device_check

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # restored to what it was (or removed) after the test
        monkeypatch.delenv(name)
    monkeypatch.setenv(REPORT_ENV, str(tmp_path))
    args_file = str(builds["cpu-moe"] / "megatron.args")
    assert device_check.main([args_file, "--devices", "2"]) == 2
    lines, failure = read_report(tmp_path)
    assert lines is None
    assert str(failure) == (f"{args_file}: device check on rank 0: started as 1 processes; the layer's sharding "
                            "(tp1 ep2 etp1, 2 processes) needs 2")


def test_an_out_of_memory_failure_says_so_with_the_planners_peak():
    import torch

    from dpoc.runtime.device_check import reason

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nmore")
    assert reason(oom, {"peak_bytes": 3 * 2**30, "held_bytes": 2**30, "step_s": 1.0}) == \
        "out of memory (the planner expects a peak of 3.00 GiB): CUDA out of memory. Tried to allocate 2.00 GiB."
    npu = RuntimeError("NPU out of memory. Tried to allocate 1.00 GiB")  # torch_npu's
    assert reason(npu, None) == "out of memory: NPU out of memory. Tried to allocate 1.00 GiB"
    assert reason(KeyError("npu_swiglu"), None) == "'npu_swiglu'"
