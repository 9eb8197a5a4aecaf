"""The device check's group (dpoc/contract/check_group.py) and how its launcher (dpoc/launch/preflight.py) turns
the group's end into one line. The group itself is stood in for by a fake torchrun (no process is started):
the real two-process runs are tests/runtime/test_device_check.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpoc.cli import main
from dpoc.contract.check_group import REPORT_ENV, CheckGroup, check_group, write_failure, write_lines
from dpoc.contract.errors import Problem
from dpoc.launch import preflight
from dpoc.planner.one_layer import estimate
from tests.conftest import REPO


@pytest.mark.parametrize("sizes, devices, group", [
    ((1, 1, 1, 0, 0), 2, CheckGroup(1, 1, 1, 1, 0, False)),  # dense: ep and etp do not apply
    ((2, 1, 1, 0, 0), 2, CheckGroup(2, 2, 1, 1, 0, False)),
    ((1, 2, 1, 8, 2), 2, CheckGroup(2, 1, 2, 1, 8, False)),
    ((2, 2, 1, 8, 2), 8, CheckGroup(2, 2, 2, 1, 8, False)),  # lcm(tp, etp * ep): dp 1, experts over both
    ((2, 8, 2, 128, 8), 16, CheckGroup(16, 2, 8, 2, 128, False)),  # the 235B recipe on an A3 node
    ((2, 8, 2, 128, 8), 8, CheckGroup(8, 2, 4, 2, 64, True)),  # on an A2 node: 16 experts per rank, as planned
    ((1, 8, 1, 8, 2), 1, CheckGroup(1, 1, 1, 1, 2, True)),  # one device: still top-2 to route to
])
def test_the_group_keeps_each_ranks_shapes_within_the_node(sizes, devices, group):
    assert check_group(*sizes, devices) == group


class FakeTorchrun:
    """Stands in for the group: writes what its ranks would into the report folder, exits with `code`."""

    def __init__(self, code: int, failures=(), lines=None, said: str = ""):
        self.code, self.failures, self.lines, self.said = code, failures, lines, said
        self.commands = []

    def __call__(self, command, env, stdout, stderr):
        self.commands.append(command)
        folder = env[REPORT_ENV]
        for rank, problem in self.failures:
            write_failure(folder, rank, problem)
        if self.lines is not None:
            write_lines(folder, self.lines)
        stdout.write(f"noise\n{self.said}\n")
        return self

    def wait(self, timeout=None):
        return self.code


@pytest.fixture
def moe_build(tmp_path) -> Path:
    from dpoc.compiler.pipeline import build

    return build(REPO / "recipes" / "tiny_moe_cpu.yaml", [], out=tmp_path / "moe")[1]


def test_the_group_is_started_at_its_size_with_the_planners_figures(moe_build, monkeypatch, capsys):
    fake = FakeTorchrun(0, lines=["device check: x: ok, 0.01s"])
    monkeypatch.setattr(preflight.subprocess, "Popen", fake)
    assert main(["preflight", str(moe_build), "--device"]) == 0
    assert capsys.readouterr().out == "device check: x: ok, 0.01s\n"
    command = fake.commands[0]
    assert command[1:6] == ["-m", "dpoc.runtime.torchrun", "--standalone", "--nproc_per_node", "2"]
    plan = json.loads((moe_build / "plan.json").read_text())
    figures = json.loads(command[command.index("--planner") + 1])
    assert figures == pytest.approx(vars(estimate(plan, check_group(1, 2, 1, 8, 2, 2))))


def test_the_first_failure_is_the_one_line(moe_build, monkeypatch, capsys):
    """Rank 1 failed first (out of memory); rank 0's later failure followed from it and is not printed."""
    args = str(moe_build / "megatron.args")
    first = Problem(args, "device check attention (sdpa)", "out of memory: CUDA out of memory.")
    fake = FakeTorchrun(1, failures=[(1, first)])
    monkeypatch.setattr(preflight.subprocess, "Popen", fake)
    later = Problem(args, "device check collective all_reduce (gloo)", "connection closed by peer")

    def and_then_rank_0(command, env, stdout, stderr):
        fake(command, env, stdout, stderr)
        write_failure(env[REPORT_ENV], 0, later)
        return fake

    monkeypatch.setattr(preflight.subprocess, "Popen", and_then_rank_0)
    assert main(["preflight", str(moe_build), "--device"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"{first}\n"


def test_a_group_that_dies_unreported_names_its_first_failed_rank_and_keeps_the_log(moe_build, monkeypatch,
                                                                                     capsys):
    said = "[dpoc] torchrun: rank 1 failed first, with exit code -9"
    monkeypatch.setattr(preflight.subprocess, "Popen", FakeTorchrun(1, said=said))
    assert main(["preflight", str(moe_build), "--device"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"{moe_build / 'megatron.args'}: device check: torchrun: rank 1 failed first, with "
                             "exit code -9, before any process reported (tp1 ep2 etp1, 2 processes; their output: ")
    log = Path(err[0].split("their output: ")[1].split(";")[0])
    assert log.read_text() == f"noise\n{said}\n"
    log.unlink()
