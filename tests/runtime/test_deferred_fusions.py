"""megatron-core's fused kernels are compiled on first call, so importing the runtime (or writing a dataset) does not
import TorchDynamo: the same `torch.compile` of the same function, made later (dpoc/common/deferred_fusions.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dpoc.common import deferred_fusions
from dpoc.common.deferred_fusions import deferred
from tests.conftest import REPO


def test_the_fuser_runs_once_on_the_first_call_and_its_result_serves_every_call(monkeypatch):
    monkeypatch.setattr(deferred_fusions, "_eager", False)  # an earlier test in this process may have selected cpu
    made = []

    def fuser(function):
        made.append(function)
        return lambda x: function(x) * 10

    @deferred(fuser)
    def double(x):
        """Twice x."""
        return 2 * x

    assert made == [] and double.__name__ == "double" and double.__doc__ == "Twice x."
    assert (double(1), double(2)) == (20, 40)
    assert len(made) == 1 and made[0](3) == 6


def test_on_cpu_the_deferred_functions_run_as_written_and_nothing_is_compiled(monkeypatch):
    """The runtime has no fusions on cpu; compiling megatron's MoE router helper cost each rank seconds."""
    from dpoc.runtime.model import device

    monkeypatch.setattr(deferred_fusions, "_eager", False)
    made = []

    @deferred(lambda function: made.append(function) or function)
    def triple(x):
        return 3 * x

    device.select("cpu", "gloo")
    assert triple(2) == 6 and made == []


_PROBE = """
import sys, torch
import dpoc.runtime.train
import megatron.core.jit as jit
print(sorted(m for m in ("torch._dynamo", "torch._inductor.compile_fx") if m in sys.modules), jit.jit_fuser.fuser is torch.compile)
"""


@pytest.mark.slow
def test_importing_the_runtime_and_megatron_core_imports_no_dynamo():
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", _PROBE], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "[] True"


_WRITER = """
import sys
from dpoc.data.pairwise import PairwiseWriter
PairwiseWriter(sys.argv[1])
print(sorted(m for m in ("dpoc.runtime", "torch._dynamo") if m in sys.modules))
"""


@pytest.mark.slow
def test_the_dataset_writer_imports_megatron_core_without_dynamo(tmp_path):
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", _WRITER, str(tmp_path / "pairs")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "[]"
