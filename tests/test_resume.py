"""Crash-safe checkpoints through the rendered node script (2 gloo processes): a job killed with SIGKILL in
the middle of a save (after an earlier checkpoint and two more logged steps), then preempted with SIGTERM,
and started again each time by the same script, logs exactly the steps of an uninterrupted run, bit for
bit, each once."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from dpoc.common.ports import free_port
from dpoc.compiler.pipeline import build
from dpoc.contract.runs import METRICS, PREEMPTED, TRACKER, folder_name
from dpoc.runtime.checkpoint import publish
from dpoc.runtime.checkpoint.save_load import PAUSE_ENV
from tests.conftest import NO_DEVICE_CHECK, RECIPES, REPO
from tests.runtime.synthetic import write_pairs

STEPS = 8
TIMED = ("samples_per_s", "tokens_per_s")  # wall-clock rates differ run to run; everything else must not




@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    # no _stats.json: accepted (as a MindSpeed-LLM dataset is) with a warning that its settings are unknown
    return write_pairs(tmp_path_factory.mktemp("resume-data") / "pairs", pairs=64)


def _build(where: Path, data: str, steps: int = STEPS) -> tuple[Path, Path]:
    out, run = where / "build", where / "run"
    build(RECIPES / "tiny_cpu.yaml", [f"training.train_iters={steps}", "training.save_interval=2",
                                      f"dataset.output_prefix={data}", f"run_dir={run}"], out=out)
    return out / "nodes" / "node-0.sh", run


class Job:
    """One start of a node script, in a session of its own (killed at the end of the test if still running)."""

    def __init__(self, script: Path, log: Path, **env: str):
        self.log = log
        self._out = open(log, "w")  # noqa: SIM115 (closed in finish/kill)
        environment = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
                       "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "DPOC_MASTER_PORT": str(free_port()),
                       **NO_DEVICE_CHECK, **env}  # resume, not the device check, is under test
        self.proc = subprocess.Popen(["bash", str(script)], cwd=REPO, env=environment, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)  # its signals only
        _STARTED.append(self)

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the job ended before {what}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s:\n{self.text()[-3000:]}"
            time.sleep(0.05)

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL to the whole job: the script, torchrun and the workers, which torchrun starts in sessions of
        their own (so the script's process group does not hold them). A finished job has none left."""
        if self.proc.poll() is None:
            root = psutil.Process(self.proc.pid)
            for process in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            self.proc.wait()
        self._out.close()

    def text(self) -> str:
        return self.log.read_text()


_STARTED: list[Job] = []


@pytest.fixture(autouse=True)
def _no_job_left_running():
    yield
    while _STARTED:
        _STARTED.pop().kill()


def kill_mid_save(script: Path, log: Path, iteration: int, flag: Path) -> None:
    """Start the job and SIGKILL all of it in the middle of the save of `iteration`."""
    job = Job(script, log, **{PAUSE_ENV: f"{iteration}:{flag}"})
    job.wait_for(flag.exists, f"save of step {iteration}")
    job.kill()
    flag.unlink()


def _steps(run: Path) -> list[dict]:
    path = run / METRICS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMED} for row in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data) -> Path:
    """The run directory of the job run once, start to end (its checkpoints inside)."""
    where = tmp_path_factory.mktemp("uninterrupted")
    script, run = _build(where, data)
    job = Job(script, where / "job.log")
    assert job.finish() == 0, job.text()[-3000:]
    assert publish.iterations(run / "checkpoints") == [8, 6]  # checkpoint.keep = 2
    return run


@pytest.mark.slow
def test_killed_mid_save_then_preempted_the_job_resumes_exactly(tmp_path, data, uninterrupted):
    script, run = _build(tmp_path, data)
    save = run / "checkpoints"

    # 1. SIGKILL in the middle of the save of step 4: step 2's checkpoint stays the one to resume from
    kill_mid_save(script, tmp_path / "1.log", 4, tmp_path / "paused")
    assert publish.iterations(save) == [2] and (save / TRACKER).read_text() == "2\n"
    assert [p.name.split(".tmp-")[0] for p in save.glob("*.tmp-*")] == ["iter_0000004"]
    assert [r["step"] for r in _steps(run)] == [1, 2, 3, 4]

    # 2. started again, it resumes from step 2; SIGTERM to the node script while it saves step 4: it finishes
    # that save, stops after step 5 with a checkpoint and exits 75, and the script says so
    flag = tmp_path / "paused-for-sigterm"
    job = Job(script, tmp_path / "2.log", **{PAUSE_ENV: f"4:{flag}"})
    job.wait_for(flag.exists, "save of step 4")
    job.proc.send_signal(signal.SIGTERM)
    time.sleep(1)  # the trap's pkill reaches the workers
    flag.unlink()
    assert job.finish() == 75, job.text()[-3000:]
    text = job.text()
    assert "[dpoc] node 0/1: resume run" in text
    assert f"removed {save}/iter_0000004.tmp-" in text and "the temporary folder of a save that did not finish" in text
    assert f"resumed from {save}/iter_0000002: iteration 2, 16 samples consumed" in text
    preempted_at = int((save / PREEMPTED).read_text())
    assert (f"[dpoc] node 0/1: preempted, resumable: checkpoint of step {preempted_at} saved in {save}; run this "
            "script again to resume") in text
    assert publish.iterations(save)[:2] == [preempted_at, 4] and 4 < preempted_at < STEPS
    assert json.loads((save / folder_name(preempted_at) / "dpoc_checkpoint.json").read_text())["reason"] \
        == "preempted"
    assert [r["step"] for r in _steps(run)] == list(range(1, preempted_at + 1))

    # 3. the last start finishes: every step once, bit-identical to the uninterrupted run
    job = Job(script, tmp_path / "3.log")
    assert job.finish() == 0, job.text()[-3000:]
    assert f"resumed from {save}/{folder_name(preempted_at)}" in job.text()
    assert not (save / PREEMPTED).exists()  # the node script clears the last run's notice
    assert _untimed(_steps(run)) == _untimed(_steps(uninterrupted))
    assert publish.iterations(save) == [8, 6] and not list(save.glob("*.tmp-*"))

    # a fresh start over this run is refused before anything runs
    job = Job(script, tmp_path / "4.log", DPOC_RESUME="0")
    assert job.finish() == 2
    assert f"{run}/metrics.jsonl: (file): holds 8 steps of an earlier run" in job.text()


@pytest.mark.slow
def test_a_longer_run_continues_from_its_last_checkpoint_on_its_own_schedule(tmp_path, data, uninterrupted):
    """The finished 8-step job rebuilt with train_iters 12: it resumes at step 8 and follows the 12-step
    schedule from there (warm-up 3, cosine from 1e-3 to 1e-4), so the learning rate rises again."""
    script, run = _build(tmp_path, data, steps=12)
    shutil.copytree(uninterrupted, run)
    job = Job(script, tmp_path / "job.log")
    assert job.finish() == 0, job.text()[-3000:]
    text = job.text()
    assert f"resumed from {run}/checkpoints/iter_0000008" in text
    assert "LR schedule: lr_decay_steps 8 -> 12, wd_incr_steps 8 -> 12; this run's schedule applies from step 8 on" \
        in text
    rows = _steps(run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert _untimed(rows[:8]) == _untimed(_steps(uninterrupted))
    for row in rows[8:]:
        done = row["step"] - 1
        expected = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi * (done - 3) / (12 - 3)))
        assert row["lr"] == pytest.approx(expected, rel=1e-9), row["step"]
    assert rows[8]["lr"] > rows[7]["lr"]
