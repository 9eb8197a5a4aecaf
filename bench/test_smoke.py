"""Every benchmark runs at its `--smoke` size and writes a result shaped like its committed one (every field as
its schema, bench/schemas/<name>.schema.json, says), and a smoke run never writes bench/results. CI runs this
after the tests (`.ci/run`; it needs the `bench` extra), so no benchmark can rot unseen:
`pytest -q bench/test_smoke.py`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from bench._shared import result_digests as _results
from bench._shared import smoke_problems

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith(("_", "test_")))
# bench/gpu_check.sh --dry runs `dpo_vs_trl.py --smoke --out FILE` itself, and bench/test_gpu_check.py checks that
# result as the test below checks the others (smoke_problems), so it is not run twice
SMOKED = [p for p in SCRIPTS if p.stem != "dpo_vs_trl"]


def test_every_benchmark_has_its_committed_result():
    assert [p.stem for p in SCRIPTS] == [p.stem for p in sorted(RESULTS.glob("*.json"))]


def test_a_smoke_run_writes_no_result_unless_told_where(tmp_path):
    from bench._shared import RESULTS as shared_results
    from bench._shared import write_result

    assert shared_results == RESULTS
    data = {k: v for k, v in json.loads((RESULTS / "checkpoint.json").read_text()).items()
            if not k.startswith("measured_")}
    before = _results()
    assert write_result(argparse.Namespace(smoke=True, out=None), "checkpoint", data, ["bench/_shared.py"]) is None
    assert _results() == before
    out = write_result(argparse.Namespace(smoke=True, out=tmp_path / "r" / "checkpoint.json"), "checkpoint", data,
                       ["bench/_shared.py"])
    assert os.listdir(out.parent) == ["checkpoint.json"]  # no temporary left
    head = _git("rev-parse", "HEAD").strip()
    dirty = sorted(line[3:] for line in _git("status", "--porcelain", "--", "bench/_shared.py").splitlines())
    assert json.loads(out.read_text()) == {**data, "measured_commit": head, "measured_paths": ["bench/_shared.py"],
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
    """Each names a commit in HEAD's history and paths in the tree; a result whose measured code changed since
    its commit (per `git log`) is reported as a warning, not a failure: re-measuring needs a quiet machine."""
    from bench._shared import changes_since

    stale = {}
    for path in sorted(RESULTS.glob("*.json")):
        result = json.loads(path.read_text())
        # an ancestor of HEAD, not merely an object here: a clean clone of main holds no helper branch's commits
        ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", result["measured_commit"], "HEAD"], cwd=REPO)
        assert ancestor.returncode == 0, f"{path.name}: measured_commit is not in main's history"
        assert result["measured_paths"] and all((REPO / p).exists() for p in result["measured_paths"]), path.name
        changes = changes_since(result)
        if changes or result["measured_uncommitted"]:
            stale[path.name] = changes
    if stale:
        listed = "; ".join(f"{name}: {len(c)} commits since, newest {c[0].split()[0] if c else '-'}"
                           for name, c in stale.items())
        warnings.warn(StaleResult(f"stale results (measured code changed since measured_commit, or uncommitted when "
                                  f"measured): {listed}"), stacklevel=1)


@pytest.mark.parametrize("script", SMOKED, ids=lambda p: p.stem)
def test_benchmark_runs_at_its_smoke_size(script, tmp_path):
    before = _results()
    out = tmp_path / f"{script.stem}.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    # the same shape as the real results (nothing renamed or lost), every nested field as its schema says
    assert smoke_problems(script.stem, json.loads(out.read_text())) == []
    assert _results() == before
