""".ci/run cannot pass a broken install: it runs the README's test command step by step, and any failed step
stops it before the next one. Run here with every program it calls replaced by a recorder that can fail."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

CI = REPO / ".ci" / "run"


def ci_steps() -> list[str]:
    """The commands .ci/run runs, in order (its lines less comments, blanks, `set` and the `cd` to the root)."""
    lines = [line.strip() for line in CI.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith(("#", "set ", "cd "))]


def readme_test_command() -> list[str]:
    """The quick start's second command (set up the test dependencies, run the tests), split at its `&&`."""
    lines = (REPO / "README.md").read_text().splitlines()
    comment = next(i for i, line in enumerate(lines) if re.match(r"# 2\. .*run the tests", line))
    return lines[comment + 1].split(" && ")


def test_ci_runs_the_readmes_test_command_then_ruff_then_the_bench_smokes():
    steps = ci_steps()
    readme = readme_test_command()
    assert steps[:len(readme)] == readme
    assert steps[len(readme):] == [".venv/bin/ruff check dpoc bench tests",
                                   ".venv/bin/pip install -q torch==2.13.0 -e '.[runtime,ray,test,bench]'",
                                   ".venv/bin/python -m pytest -q bench/test_smoke.py bench/test_planner.py bench/test_gpu_check.py"]


def test_no_step_is_chained():
    """`a && b` under `set -e` does not stop the script when `a` fails: every step stands on its own line."""
    assert CI.read_text().splitlines()[4] == "set -euo pipefail"
    assert [s for s in ci_steps() if re.search(r"&&|\|\||;", s)] == []


_RECORDER = """#!/bin/sh
echo "$(basename "$0") $*" >> "$CI_LOG"
[ "$(wc -l < "$CI_LOG")" -ne "$CI_FAIL_AT" ]
"""


def _run_ci(tmp_path: Path, fail_at: int) -> tuple[int, list[str]]:
    """Run a copy of .ci/run whose python3 / pip / python / ruff record their arguments; the `fail_at`-th
    call (1-based; 0: none) exits 1. A .venv from an earlier run is already there, as on a CI worker."""
    root = tmp_path / "repo"
    (root / ".ci").mkdir(parents=True)
    shutil.copy2(CI, root / ".ci" / "run")
    fake_bin, venv_bin = tmp_path / "bin", root / ".venv" / "bin"
    for folder, names in ((fake_bin, ["python3"]), (venv_bin, ["pip", "python", "ruff"])):
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).write_text(_RECORDER)
            (folder / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "CI_LOG": str(log), "CI_FAIL_AT": str(fail_at),
           "HOME": os.environ.get("HOME", str(tmp_path))}
    done = subprocess.run(["bash", str(root / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    return done.returncode, log.read_text().splitlines()


def _as_called(step: str) -> str:
    """A step as its recorder logs it: the program's base name, then its arguments with the shell's quotes gone."""
    program, *args = step.split(" ")
    return " ".join([Path(program).name, *(a.replace("'", "") for a in args)])


def test_a_run_where_every_step_passes_runs_them_all_in_order(tmp_path):
    code, calls = _run_ci(tmp_path, fail_at=0)
    assert (code, calls) == (0, [_as_called(s) for s in ci_steps()])


@pytest.mark.parametrize("failing", [1, 2], ids=["venv", "install"])
def test_a_failed_install_fails_the_run_before_pytest_starts(tmp_path, failing):
    """The venv or the pip install fails: the run fails, and no pytest runs on the stale .venv."""
    code, calls = _run_ci(tmp_path, fail_at=failing)
    assert code != 0
    assert len(calls) == failing and not any("pytest" in call for call in calls)


@pytest.mark.parametrize("failing", range(1, 7), ids=lambda k: f"step{k}")
def test_a_failed_step_fails_the_run_and_nothing_after_it_runs(tmp_path, failing):
    assert len(ci_steps()) == 6
    code, calls = _run_ci(tmp_path, fail_at=failing)
    assert code != 0
    assert calls == [_as_called(s) for s in ci_steps()[:failing]]
