"""A failed node's summary in `dpoc launch` quotes the first error (the last line of the first failing rank's
traceback), and the node's torchrun (`dpoc.runtime.torchrun`) ends the failure in one line, not torchrun's
traceback and boxed report."""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from dpoc.common.ports import free_port
from dpoc.contract.runs import first_failure_line
from dpoc.launch.first_error import first_error
from dpoc.launch.job import Job, Report, launch
from tests.conftest import REPO, script_env

_FAILS_ON_RANK_1 = """import os, time
def inner():
    raise ValueError(f"boom on rank {os.environ['RANK']}")
if os.environ["RANK"] == "1":
    inner()
time.sleep(60)
"""


@pytest.fixture(scope="module")
def torchrun_output(tmp_path_factory) -> list[str]:
    """Real output of the node scripts' torchrun: rank 1 raises, rank 0 is stopped."""
    script = tmp_path_factory.mktemp("torchrun") / "train.py"
    script.write_text(_FAILS_ON_RANK_1)
    done = subprocess.run([sys.executable, "-m", "dpoc.runtime.torchrun", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script)], cwd=REPO, env=script_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    return done.stderr.splitlines()


def test_a_failure_ends_in_one_line_naming_the_first_rank(torchrun_output):
    assert torchrun_output[-1] == first_failure_line(1, 1, 1) == (
        "[dpoc] torchrun: rank 1 failed first, with exit code 1; 1 other rank ended after it")
    assert not any("ChildFailedError" in line or "closing signal" in line for line in torchrun_output)
    assert len(torchrun_output) == 7, torchrun_output  # the rank's traceback (6 lines) and the closing line


def test_the_first_failing_ranks_exception_line_is_found(torchrun_output):
    assert first_error(torchrun_output) == "ValueError: boom on rank 1"
    assert first_error(["step 1/4 | loss 0.69", "torchrun: exit 1"]) is None


def test_prefixed_interleaved_tracebacks_take_the_root_causes_rank():
    lines = ["[rank0]: Traceback (most recent call last):", "[rank1]: Traceback (most recent call last):",
             '[rank0]:   File "a.py", line 1, in <module>', '[rank1]:   File "a.py", line 1, in <module>',
             "[rank0]: RuntimeError: rank 0 saw its peer go", "[rank1]: KeyError: 'the real cause'",
             first_failure_line(1, 1, 1)]
    assert first_error(lines) == "KeyError: 'the real cause'"
    assert first_error(lines[:6]) == "RuntimeError: rank 0 saw its peer go"  # no closing line: the first traceback


@dataclass
class _Failed:
    """One node that prints torchrun's failure and exits 1."""

    output: list[str]
    where: list[str] = field(default_factory=lambda: ["here"])
    polled: bool = False

    def poll(self) -> list[Report]:
        if self.polled:
            return [Report(0, [], 1)]
        self.polled = True
        return [Report(0, self.output, 1)]

    def stop(self) -> list[Report]:
        return [Report(0, [], 1)]

    def explain(self, report: Report) -> str:
        return "failed with exit code 1"


def test_launch_quotes_the_first_error(tmp_path, torchrun_output):
    job = Job(build=tmp_path, workdir=tmp_path, name="t", plan_hash="0" * 64, runtime="dpoc", nodes=1,
              hosts=("127.0.0.1",), device="cpu", devices_per_node=2, run_dir="run", save="ck", max_restarts=0)
    err = io.StringIO()
    code = launch(type("E", (), {"start": lambda self, job, attempt: _Failed(torchrun_output)})(), job, err=err, out=io.StringIO())
    assert code == 1
    said = err.getvalue().splitlines()
    assert said[1].endswith(f"every node is stopped; its first error (the whole output: {tmp_path}/run/launch/"
                            "node-0.log):")
    assert said[2:] == ["  [node 0] ValueError: boom on rank 1"]
