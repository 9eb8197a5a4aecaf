"""The fused npu kernels (dpoc/runtime/model/fused.py: npu_rms_norm, npu_rotary_mul, npu_swiglu) compute what
the unfused paths compute: a tiny model on the npu stand-in, fused and unfused from the same seeded weights,
gives the same per-token losses and every gradient (float32), and the fused run calls each kernel
(fused_probe.py, all three in one launch). Dense, MoE with the grouped experts and MoE with SequentialMLP's experts: each builds its
activation in another place."""

from __future__ import annotations

import json

import pytest

from tests.runtime.batched import Runs
from tests.runtime.synthetic import write_args

pytestmark = pytest.mark.slow
MODELS = {"dense": (False, []), "moe-grouped": (True, [("--moe-grouped-gemm", True)]), "moe-sequential": (True, [])}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    """Every model's probe, declared up front: one launch (the npu stand-in) runs them all."""
    root = tmp_path_factory.mktemp("fused")
    runs = Runs(root / "launches")
    for model, (moe, extra) in MODELS.items():
        args = write_args(root / f"{model}.args", str(root / "pairs"), root / model, moe=moe,
                          extra=[("--dpoc-device", "npu"), ("--distributed-backend", "hccl"), *extra])
        runs.add(model, ["-m", "tests.runtime.fused_probe", args], 1, "npu")
    return runs


@pytest.mark.parametrize("model", MODELS)
def test_fused_kernels_equal_the_unfused_paths(runs, model):
    done = runs.result(model)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    fused, unfused = result["fused"], result["unfused"]
    assert unfused["calls"] == {}
    assert set(fused["calls"]) == {"npu_rms_norm", "npu_rotary_mul", "npu_swiglu"}
    assert fused["losses"] == pytest.approx(unfused["losses"], rel=1e-5, abs=1e-6)
    assert sorted(fused["grads"]) == sorted(unfused["grads"])
    for name, grad in fused["grads"].items():
        assert grad == pytest.approx(unfused["grads"][name], rel=1e-4, abs=1e-6), name
