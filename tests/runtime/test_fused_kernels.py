"""The fused npu kernels (dpoc/runtime/model/fused.py: npu_rms_norm, npu_rotary_mul, npu_swiglu) compute what
the unfused paths compute: a tiny model on the npu stand-in, fused and unfused from the same seeded weights,
gives the same per-token losses and every gradient (float32), and the fused run calls each kernel
(fused_probe.py). Dense, MoE with the grouped experts and MoE with SequentialMLP's experts: each builds its
activation in another place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.runtime.synthetic import write_args
from tests.runtime.test_device_stubs import run_python

pytestmark = pytest.mark.slow
MODELS = {"dense": (False, []), "moe-grouped": (True, [("--moe-grouped-gemm", True)]), "moe-sequential": (True, [])}


@pytest.mark.parametrize("model", MODELS)
def test_fused_kernels_equal_the_unfused_paths(tmp_path, model):
    moe, extra = MODELS[model]
    args = write_args(tmp_path / "npu.args", str(tmp_path / "pairs"), tmp_path / "run", moe=moe,
                      extra=[("--dpoc-device", "npu"), ("--distributed-backend", "hccl"), *extra])
    done = run_python(str(Path(__file__).with_name("fused_probe.py")), str(args))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    fused, unfused = result["fused"], result["unfused"]
    assert unfused["calls"] == {}
    assert set(fused["calls"]) == {"npu_rms_norm", "npu_rotary_mul", "npu_swiglu"}
    assert fused["losses"] == pytest.approx(unfused["losses"], rel=1e-5, abs=1e-6)
    assert sorted(fused["grads"]) == sorted(unfused["grads"])
    for name, grad in fused["grads"].items():
        assert grad == pytest.approx(unfused["grads"][name], rel=1e-4, abs=1e-6), name
