"""A failed node's summary in `dpoc launch` quotes the first error (the last line of the first failing rank's
traceback), not torchrun's closing ChildFailedError summary."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from dpoc.launch.first_error import first_error
from dpoc.launch.job import Job, Report, launch

# real torchrun 2.13 output: rank 1 raised, rank 0 was stopped with SIGTERM, torchrun's own traceback follows
TORCHRUN = (Path(__file__).parent / "torchrun_failure.txt").read_text().splitlines()


def test_the_first_failing_ranks_exception_line_is_found():
    assert first_error(TORCHRUN) == "ValueError: boom on rank 1"
    assert first_error(["step 1/4 | loss 0.69", "torchrun: exit 1"]) is None


def test_prefixed_interleaved_tracebacks_take_the_root_causes_rank():
    lines = ["[rank0]: Traceback (most recent call last):", "[rank1]: Traceback (most recent call last):",
             '[rank0]:   File "a.py", line 1, in <module>', '[rank1]:   File "a.py", line 1, in <module>',
             "[rank0]: RuntimeError: rank 0 saw its peer go", "[rank1]: KeyError: 'the real cause'",
             "Root Cause (first observed failure):", "[0]:", "  time      : now", "  rank      : 1 (local_rank: 1)"]
    assert first_error(lines) == "KeyError: 'the real cause'"
    assert first_error(lines[:6]) == "RuntimeError: rank 0 saw its peer go"  # no summary: the first traceback


@dataclass
class _Failed:
    """One node that prints torchrun's failure and exits 1."""

    where: list[str] = field(default_factory=lambda: ["here"])
    polled: bool = False

    def poll(self) -> list[Report]:
        if self.polled:
            return [Report(0, [], 1)]
        self.polled = True
        return [Report(0, TORCHRUN, 1)]

    def stop(self) -> list[Report]:
        return [Report(0, [], 1)]

    def explain(self, report: Report) -> str:
        return "failed with exit code 1"


def test_launch_quotes_the_first_error(tmp_path):
    job = Job(build=tmp_path, workdir=tmp_path, name="t", plan_hash="0" * 64, runtime="dpoc", nodes=1,
              hosts=("127.0.0.1",), device="cpu", devices_per_node=2, run_dir="run", save="ck", max_restarts=0)
    err = io.StringIO()
    code = launch(type("E", (), {"start": lambda self, job, attempt: _Failed()})(), job, err=err, out=io.StringIO())
    assert code == 1
    said = err.getvalue().splitlines()
    assert said[1].endswith(f"every node is stopped; its first error (the whole output: {tmp_path}/run/launch/"
                            "node-0.log):")
    assert said[2:] == ["  [node 0] ValueError: boom on rank 1"]
