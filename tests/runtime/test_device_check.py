"""`dpoc preflight BUILD --device` (dpoc/runtime/device_check.py): on the CPU for the tiny dense and MoE recipes
(the CI run), and on the npu and cuda stand-ins (device_stubs.py) for the tiny MoE recipe built for those
devices, where it must check each kernel the runtime runs there and, with one stand-in kernel broken
(device_stub_preflight.py), fail in one line naming the op that runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpoc.compiler.pipeline import build
from tests.conftest import RECIPES, REPO

pytestmark = pytest.mark.slow
DRIVER = Path(__file__).with_name("device_stub_preflight.py")
# the tiny MoE recipe on each stand-in, with grouped GEMM; the cuda one packs its micro-batches too
BUILDS = {
    "cpu-dense": ("tiny_cpu.yaml", []),
    "cpu-moe": ("tiny_moe_cpu.yaml", []),
    "npu": ("tiny_moe_cpu.yaml", ["hardware.preset=atlas-a2", "hardware.devices_per_node=2",
                                  "parallelism.moe_grouped_gemm=true"]),
    "cuda": ("tiny_moe_cpu.yaml", ["hardware.device=cuda", "hardware.backend=nccl",
                                   "parallelism.moe_grouped_gemm=true", "training.packing=true"]),
}
OPS = {  # the ops each build's check names, in order (the kernel in parentheses)
    "cpu-dense": ["collective all_reduce (gloo)", "RMSNorm (unfused)", "rotary (unfused)", "swiglu (unfused)",
                  "attention (sdpa)", "one layer forward, backward and optimizer step (experts -)"],
    "cpu-moe": ["collective all_reduce (gloo)", "RMSNorm (unfused)", "rotary (unfused)", "swiglu (unfused)",
                "attention (sdpa)", "one layer forward, backward and optimizer step (experts sequential)"],
    "npu": ["collective all_reduce (hccl)", "RMSNorm (torch_npu.npu_rms_norm)", "rotary (torch_npu.npu_rotary_mul)",
            "swiglu (torch_npu.npu_swiglu)", "attention (npu-fusion)", "moe experts (npu-gmm)",
            "one layer forward, backward and optimizer step (experts npu-gmm)"],
    "cuda": ["collective all_reduce (nccl)", "RMSNorm (unfused)", "rotary (unfused)", "swiglu (unfused)",
             "attention (sdpa)", "attention (sdpa, packed)", "moe experts (torch-grouped-mm)",
             "one layer forward, backward and optimizer step (experts torch-grouped-mm)"],
}


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("device-check")
    out = {}
    for name, (recipe, overrides) in BUILDS.items():
        out[name] = build(RECIPES / recipe, overrides, out=root / name)[1]
    return out


def check(build_dir: Path, kind: str, broken: str | None = None) -> subprocess.CompletedProcess:
    """The check as the node script runs it (cpu), or through the stand-in driver."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = ["-m", "dpoc", "preflight", str(build_dir), "--device"] if kind == "cpu" else \
        [str(DRIVER), kind, str(build_dir), *([broken] if broken else [])]
    return subprocess.run([sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def ops_checked(stdout: str) -> list[str]:
    prefix = "device check: "
    return [line.removeprefix(prefix).split(": ok")[0] for line in stdout.splitlines() if line.startswith(prefix)]


@pytest.mark.parametrize("name", BUILDS)
def test_the_check_runs_every_kernel_path_of_the_build(builds, name):
    done = check(builds[name], name.split("-")[0])
    assert done.returncode == 0, done.stderr[-3000:]
    assert ops_checked(done.stdout) == OPS[name]


@pytest.mark.parametrize("kind, kernel, op", [
    ("npu", "npu_rms_norm", "RMSNorm (torch_npu.npu_rms_norm)"),
    ("npu", "npu_rotary_mul", "rotary (torch_npu.npu_rotary_mul)"),
    ("npu", "npu_swiglu", "swiglu (torch_npu.npu_swiglu)"),
    ("npu", "npu_fusion_attention", "attention (npu-fusion)"),
    ("npu", "npu_grouped_matmul", "moe experts (npu-gmm)"),
    ("cuda", "_grouped_mm", "moe experts (torch-grouped-mm)"),
])
def test_a_broken_kernel_fails_the_check_naming_its_op(builds, kind, kernel, op):
    done = check(builds[kind], kind, kernel)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "device check" in line]
    assert errors == [line for line in done.stderr.splitlines() if line.startswith(str(builds[kind]))]
    assert len(errors) == 1 and errors[0].startswith(f"{builds[kind] / 'megatron.args'}: device check {op}: ")
    assert "differs from the CPU float32 result" in errors[0], errors[0]
