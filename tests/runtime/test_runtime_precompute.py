"""Precomputed reference log-probs: the pass (also at cp2), its file's key and atomic publication, and training
from it equal to the live reference (fp32, CPU: within 1e-6) in one process, at pp2, cp2 and with packing;
resume."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dpoc.common import atomic
from dpoc.contract.errors import DpocError
from dpoc.contract.runs import TRACKER, folder_name
from dpoc.runtime.reference import reference_file
from tests.runtime.batched import Runs
from tests.runtime.synthetic import model_flags, write_args, write_pairs
from tests.runtime.test_runtime_train import COMPARED, ROOT, metrics, run_module

STEPS = 2
MODEL = model_flags(layers=2)
PRECOMPUTED = [("--dpoc-reference", "precomputed"), ("--dpoc-reference-micro-batch-size", 4)]
PP2 = [("--pipeline-model-parallel-size", 2)]
PACKING = [("--dpoc-packing", True)]
CP2 = [("--context-parallel-size", 2)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("precompute")
    write_pairs(tmp / "pairs", pairs=24)
    return tmp


def _args(workdir: Path, name: str, flags=(), data: str = "pairs", **kwargs) -> Path:
    return write_args(workdir / f"{name}.args", str(workdir / data), workdir / "runs" / name, steps=STEPS,
                      model=MODEL, extra=list(flags), **kwargs)


def _ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _precompute(args_file: Path, processes: int = 1) -> subprocess.CompletedProcess:
    """The pass in a launch of its own."""
    return run_module(["-m", "dpoc.runtime.precompute", f"@{args_file}"], processes)


def _pass(runs: Runs, name: str, args_file: Path, processes: int = 1) -> None:
    runs.add(name, ["-m", "dpoc.runtime.precompute", f"@{args_file}"], processes)


def _train(runs: Runs, workdir: Path, name: str, processes: int = 1, flags=(), **kwargs) -> None:
    runs.add(name, ["-m", "dpoc.runtime.train", f"@{_args(workdir, name, flags, **kwargs)}"], processes)


def _trained(runs: Runs, workdir: Path, name: str) -> list[dict]:
    _ok(runs.result(name))
    return metrics(workdir / "runs" / name)


def _files(workdir: Path, data: str = "pairs") -> list[Path]:
    return sorted(workdir.glob(f"{data}_reference-*.npz"))


LIVE_AND_PRECOMPUTED = {  # name: (processes, flags, the precomputed run's own extra flags)
    # one process; the precomputed run saves every step (the resume test's)
    "single": (1, [("--save-interval", 1)], [("--save", "saves/single")]),
    "pp2": (2, PP2, []), "packed": (1, PACKING, []), "cp2": (2, CP2, []),
    "lora": (1, [("--lora-r", 4), ("--lora-alpha", 8.0)], []),
}


@pytest.fixture(scope="module")
def runs(workdir) -> Runs:
    """Every launch that needs no other's output first, in order: the pass over the dataset in one process (4
    pairs per micro-batch, training's is 2), then each live run and its precomputed twin, the pass at cp2 (over a
    copy of the dataset under another prefix, which gets its own file) and the refused pass of a live build."""
    runs = Runs(workdir / "launches")
    _pass(runs, "pass", _args(workdir, "pass", PRECOMPUTED))
    for name, (processes, flags, extra) in LIVE_AND_PRECOMPUTED.items():
        extra = [(flag, workdir / value) for flag, value in extra]
        _train(runs, workdir, f"live-{name}", processes, flags)
        _train(runs, workdir, f"precomputed-{name}", processes, [*flags, *PRECOMPUTED, *extra])
    for part in workdir.glob("pairs_packed_*"):
        shutil.copy(part, workdir / part.name.replace("pairs", "cp-pairs", 1))
    _pass(runs, "pass-cp2", _args(workdir, "pass-cp2", [*PRECOMPUTED, *CP2], data="cp-pairs"), 2)
    _pass(runs, "live", _args(workdir, "live", []))
    return runs


@pytest.fixture(scope="module")
def table(workdir, runs) -> Path:
    """The file the one-process pass wrote."""
    out = _ok(runs.result("pass"))
    (path,) = _files(workdir)
    assert f"wrote {path}: 24 pairs" in out.stderr
    return path


def _assert_equal(got: list[dict], expected: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, STEPS + 1))
    for mine, theirs in zip(got, expected, strict=True):
        for key in COMPARED:
            # at step 1 the policy is the reference: every margin is 0 up to rounding, and the accuracy (the
            # share of margins > 0) the sign of that rounding; compared where margins are real
            if key == "rewards/accuracies" and mine["step"] == 1:
                continue
            # 1e-6 absolute, or relative for the summed log-probs (tens in size: fp32's spacing there is ~8e-6;
            # the LM head's matmul blocks its rows differently at another micro-batch composition)
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-6), (mine["step"], key)


def _live_and_precomputed(runs: Runs, workdir: Path, table: Path, name: str) -> tuple[list, list]:
    live = _trained(runs, workdir, f"live-{name}")
    precomputed = _trained(runs, workdir, f"precomputed-{name}")
    log = (workdir / "runs" / f"precomputed-{name}" / "train.log").read_text()
    assert f"precomputed log-probs: {table}" in log
    return live, precomputed


@pytest.fixture(scope="module")
def single(runs, workdir, table) -> tuple[list, list]:
    """One process, live and precomputed."""
    return _live_and_precomputed(runs, workdir, table, "single")


@pytest.fixture(scope="module")
def again(workdir, table, single) -> tuple[Runs, int]:
    """The runs that need the first ones' files, in one launch: the pass again over a current file, and the
    precomputed run resumed from its step-1 checkpoint; and the file's mtime before them."""
    before = table.stat().st_mtime_ns
    runs = Runs(workdir / "again-launches")
    _pass(runs, "again", _args(workdir, "again", PRECOMPUTED))
    part = workdir / "saves" / "part"
    shutil.copytree(workdir / "saves" / "single" / folder_name(1), part / folder_name(1))
    atomic.write_atomically(part / TRACKER, "1\n")
    _train(runs, workdir, "resumed", flags=[*PRECOMPUTED, ("--save", part), ("--load", part)])
    return runs, before


@pytest.mark.slow
def test_one_process_from_the_file_equals_the_live_reference(single):
    live, precomputed = single
    _assert_equal(precomputed, live)


@pytest.mark.parametrize("name", ["pp2", "packed", "cp2"])
@pytest.mark.slow
def test_other_layouts_from_the_same_file_equal_the_live_reference(runs, workdir, table, name):
    """The file made in one process serves every layout: its values are keyed by pair, not by batch."""
    live, precomputed = _live_and_precomputed(runs, workdir, table, name)
    _assert_equal(precomputed, live)


@pytest.mark.slow
def test_the_pass_at_cp2_writes_the_one_process_values(runs, workdir, table):
    """Each CP rank holds part of every sequence; the log-probs written are the whole sequences'."""
    _ok(runs.result("pass-cp2"))
    (path,) = _files(workdir, "cp-pairs")
    with np.load(path) as mine, np.load(table) as theirs:
        assert mine["logps"].shape == theirs["logps"].shape == (24, 2)
        assert np.allclose(mine["logps"], theirs["logps"], rtol=1e-6, atol=1e-5)


def _namespace(args_file: Path):
    from dpoc.contract import megatron_args

    return megatron_args.parse([f"@{args_file}"])


@pytest.mark.slow
def test_a_current_file_is_kept_and_another_reference_or_dataset_gets_its_own(workdir, table, again):
    runs, before = again
    assert f"reference log-probs up to date: {table}" in _ok(runs.result("again")).stderr
    assert table.stat().st_mtime_ns == before
    assert reference_file.status(_namespace(_args(workdir, "same", PRECOMPUTED))).current
    # another reference (the seeded init of another seed; other weights hash otherwise), another dataset,
    # another cut: another key, so the file is not theirs
    write_pairs(workdir / "other", pairs=24, seed=1)
    for name, flags, data in (("seed", [("--seed", 7)], "pairs"), ("data", [], "other"),
                              ("cut", [("--seq-length", 32)], "pairs")):
        found = reference_file.status(_namespace(_args(workdir, name, [*PRECOMPUTED, *flags], data=data)))
        assert not found.current and found.path != table, name
        assert found.why.startswith("not computed yet"), (name, found.why)
    # a file whose content is not what its name says is not current either
    shutil.copy(table, workdir / "other_reference-0000000000000000.npz")
    other = reference_file.status(_namespace(_args(workdir, "data", PRECOMPUTED, data="other")))
    assert "other_reference-0000000000000000.npz" in other.why


@pytest.mark.slow
def test_the_pass_refuses_a_live_build(workdir, runs):
    done = runs.result("live")
    assert done.returncode == 2
    assert done.stderr.endswith(f"{workdir / 'live.args'}: --dpoc-reference: live: training runs the reference itself, so the "
                                "precompute pass has nothing to do (valid: precomputed)\n")


@pytest.mark.slow
def test_training_without_a_current_file_is_refused_naming_the_remedy(workdir, table):
    """What training's rank 0 reads (`precompute.shared_table` broadcasts its answer): exit 2 with this line."""
    args_file = _args(workdir, "missing", [*PRECOMPUTED, ("--seed", 99)])
    with pytest.raises(DpocError) as caught:
        reference_file.read(_namespace(args_file), str(args_file), 24)
    (problem,) = caught.value.problems
    assert str(problem).startswith(f"{args_file}: --dpoc-reference: precomputed: {workdir}/pairs_reference-")
    assert "not computed yet (present, for other references or datasets: " in problem.message
    assert problem.message.endswith("run the build's reference.sh first (the node scripts run it before training)")
    with pytest.raises(DpocError, match="holds 24 pairs, the dataset 30"):
        reference_file.read(_namespace(_args(workdir, "same", PRECOMPUTED)), "x.args", 30)


@pytest.mark.slow
def test_an_interrupted_pass_leaves_nothing_half_written(workdir, tmp_path):
    shutil.copytree(workdir, tmp_path / "w",
                    ignore=shutil.ignore_patterns("runs", "saves", "*launches", "*.npz", "*.args"))
    work = tmp_path / "w"
    args_file = _args(work, "killed", PRECOMPUTED)
    flag = tmp_path / "pause"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore",
           reference_file.PAUSE_ENV: str(flag)}
    proc = subprocess.Popen([sys.executable, "-m", "dpoc.runtime.precompute", f"@{args_file}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert flag.exists(), "the pass never reached its rename"
        proc.kill()
    finally:
        proc.wait(timeout=60)
    assert _files(work) == []
    left = list(work.glob(atomic.temporary_name("pairs_reference-") + "*")) + list(
        work.glob(".pairs_reference-*.npz.tmp-*"))
    assert left, "the complete temporary sibling should be there before the rename"
    rerun = _ok(_precompute(args_file))
    assert "left by an interrupted precompute pass" in rerun.stderr
    assert len(_files(work)) == 1 and not list(work.glob(".pairs_reference-*.npz.tmp-*"))


@pytest.mark.slow
def test_a_resumed_precomputed_run_equals_the_uninterrupted_one(workdir, single, again):
    """The single-process precomputed run saved every step; resuming from step 1 gives its step 2."""
    whole = single[1]
    resumed = _trained(again[0], workdir, "resumed")
    assert [r["step"] for r in resumed] == [2]
    for key in COMPARED:
        assert resumed[0][key] == whole[1][key], key


@pytest.mark.slow
def test_a_lora_run_reads_the_base_from_the_file_as_it_runs_it_live(runs, workdir, table):
    """The file is the base's log-probs (the policy's initial weights); a LoRA run's live reference is the same
    chunks with the adapters off: both give the same steps, the first at ln 2."""
    live, precomputed = _live_and_precomputed(runs, workdir, table, "lora")
    _assert_equal(precomputed, live)
    assert live[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
