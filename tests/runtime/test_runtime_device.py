"""The device module: which device a recipe may ask for here, and each piece of the CPU bridge.

The bridge patches torch and megatron-core process-wide, so it is exercised in a fresh process
(device_probe.py) that records every check before and after installing it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpoc.contract.errors import DpocError
from dpoc.runtime.model import device as devices

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def probe() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-W", "ignore", str(Path(__file__).with_name("device_probe.py"))],
                         capture_output=True, text=True, env=env, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _failed(probe: dict, check: str) -> str:
    assert not probe["before"][check]["ok"], f"{check} works without the bridge: it is not needed"
    return probe["before"][check]["error"]


def _value(probe: dict, check: str):
    result = probe["after"][check]
    assert result["ok"], result
    return result["value"]


@pytest.mark.slow
def test_rng_tracker_uses_the_cpu_generator(probe):
    assert "CUDA" in _failed(probe, "rng")
    first, again = _value(probe, "rng"), _value(probe, "rng_repeat")
    assert first["default_untouched"]  # forking the model-parallel state leaves the default stream alone
    assert first["draw"] == again["draw"]  # the same seed gives the same model-parallel draws


@pytest.mark.parametrize("check", ["factory", "integer_device", "current_device", "tensor_to_cuda"])
def test_cuda_devices_become_the_cpu(probe, check):
    _failed(probe, check)
    assert _value(probe, check) == "cpu"


@pytest.mark.parametrize("check", ["synchronize", "streams"])
def test_streams_and_synchronisation_are_inert(probe, check):
    assert "CUDA" in _failed(probe, check)
    assert _value(probe, check) is True


def test_cpu_tensors_report_the_cuda_type_name_megatron_asserts(probe):
    assert probe["before"]["type_name"]["value"] == "torch.FloatTensor"
    assert _value(probe, "type_name") == "torch.cuda.FloatTensor"  # also under the function mode: once
    assert _value(probe, "type_conversion") == "torch.float64"  # .type(dtype) still converts


def test_tensors_moved_to_cuda_stay_on_the_cpu(probe):
    assert "CUDA" in _failed(probe, "tensor_cuda")  # tied embeddings at pp>1 call weight.data.cuda()
    assert _value(probe, "tensor_cuda") == "cpu"


def test_pinned_memory_is_plain_cpu_memory(probe):
    assert "pin_memory" in _failed(probe, "pinned")
    assert _value(probe, "pinned") == "cpu"


def test_moe_split_sizes_become_numpy(probe):
    assert probe["before"]["moe_split_sizes"]["value"] == "Tensor"
    assert _value(probe, "moe_split_sizes") == "ndarray"


def test_router_runs_without_transformer_engine(probe):
    assert _failed(probe, "router_gemm") == "NameError: name 'te_general_gemm' is not defined"
    assert _value(probe, "router_gemm") == [[4.0, 4.0, 4.0], [4.0, 4.0, 4.0]]


def test_npu_without_torch_npu_is_a_clear_error():
    if importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("torch_npu is installed here")
    with pytest.raises(DpocError) as err:
        devices.select("npu", "hccl", "build/x/megatron.args")
    message = str(err.value)
    assert message.startswith("build/x/megatron.args: --dpoc-device: npu requested but torch_npu cannot be "
                              "imported (No module named 'torch_npu'); install torch_npu matching torch ")
    assert "source CANN's set_env.sh" in message and message.endswith("(valid here: cpu)")


def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(DpocError) as err:
        devices.select("cuda", "nccl", "m.args")
    assert str(err.value) == (f"m.args: --dpoc-device: cuda requested but torch sees no CUDA device "
                              f"(torch {torch.__version__}; valid here: cpu)")


def test_backend_must_fit_the_device():
    with pytest.raises(DpocError) as err:
        devices.select("cpu", "nccl", "m.args")
    assert str(err.value) == ("m.args: --distributed-backend: nccl does not drive --dpoc-device cpu "
                              "(valid: gloo)")


def test_accelerators_run_without_the_bridge():
    with devices.running_on(devices.Device("cuda", "nccl", experts="npu-gmm")):
        assert torch.empty(1).device.type == "cpu"
        with pytest.raises((AssertionError, RuntimeError)):
            torch.empty(1, device="cuda")
