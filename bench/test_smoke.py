"""Every benchmark runs at its `--smoke` size and writes a result shaped like its committed one, and a smoke run
never writes bench/results. CI runs this after the tests (`.ci/run`; it needs the `bench` extra), so no
benchmark can rot unseen: `pytest -q bench/test_smoke.py`."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith(("_", "test_")))


def _results() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(RESULTS.glob("*.json"))}


def test_every_benchmark_has_its_committed_result():
    assert [p.stem for p in SCRIPTS] == [p.stem for p in sorted(RESULTS.glob("*.json"))]


def test_a_smoke_run_writes_no_result_unless_told_where(tmp_path):
    from bench._shared import RESULTS as shared_results
    from bench._shared import write_result

    assert shared_results == RESULTS
    assert write_result(argparse.Namespace(smoke=True, out=None), "x", {"a": 1}, ["bench/_shared.py"]) is None
    assert not (RESULTS / "x.json").exists()
    out = write_result(argparse.Namespace(smoke=True, out=tmp_path / "r" / "x.json"), "x", {"a": 1},
                       ["bench/_shared.py"])
    assert os.listdir(out.parent) == ["x.json"]  # no temporary left
    head = _git("rev-parse", "HEAD").strip()
    dirty = sorted(line[3:] for line in _git("status", "--porcelain", "--", "bench/_shared.py").splitlines())
    assert json.loads(out.read_text()) == {"a": 1, "measured_commit": head, "measured_paths": ["bench/_shared.py"],
                                           "measured_uncommitted": dirty}


def test_a_result_cannot_claim_code_that_is_not_in_the_tree():
    from bench._shared import provenance

    with pytest.raises(ValueError, match=r"measured paths not in the tree: \['bench/nothing.py'\]"):
        provenance(["bench/_shared.py", "bench/nothing.py"])


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


class StaleResult(UserWarning):
    """A committed result whose measured code changed after it was measured: re-measure on a quiet machine."""


def test_every_committed_result_says_what_it_measured_and_the_stale_ones_are_listed():
    """Each names a real commit and paths in the tree; a result whose measured code changed since its commit
    (per `git log`) is reported as a warning, not a failure: re-measuring needs a quiet machine."""
    from bench._shared import changes_since

    stale = {}
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        assert _git("cat-file", "-t", result["measured_commit"]).strip() == "commit", path.name
        assert result["measured_paths"] and all((REPO / p).exists() for p in result["measured_paths"]), path.name
        changes = changes_since(result)
        if changes or result["measured_uncommitted"]:
            stale[path.name] = changes
    if stale:
        listed = "; ".join(f"{name}: {len(c)} commits since, newest {c[0].split()[0] if c else '-'}"
                           for name, c in stale.items())
        warnings.warn(StaleResult(f"stale results (measured code changed since measured_commit, or uncommitted when "
                                  f"measured): {listed}"), stacklevel=1)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_runs_at_its_smoke_size(script, tmp_path):
    before = _results()
    out = tmp_path / f"{script.stem}.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    smoke, committed = json.loads(out.read_text()), json.loads((RESULTS / f"{script.stem}.json").read_text())
    assert sorted(smoke) == sorted(committed)  # the same shape as the real results: nothing renamed or lost
    assert smoke["measured_commit"] == _git("rev-parse", "HEAD").strip()
    assert _results() == before
