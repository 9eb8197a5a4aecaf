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
    assert write_result(argparse.Namespace(smoke=True, out=None), "x", {"a": 1}) is None
    assert not (RESULTS / "x.json").exists()
    out = write_result(argparse.Namespace(smoke=True, out=tmp_path / "r" / "x.json"), "x", {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1} and os.listdir(out.parent) == ["x.json"]  # no temporary left


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
    assert _results() == before
