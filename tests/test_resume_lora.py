"""A LoRA job (the tiny recipe with a lora section, 2 gloo processes through its node script) killed with SIGKILL
in the middle of a save and started again logs exactly the steps of an uninterrupted run, bit for bit: its
adapter-only checkpoints, their optimizer state, RNG and data position are all a resume needs. One of those
checkpoints (saved at dp2) also resumes at tp2 (sequence parallel), resharded, and its loss goes on as the
uninterrupted run's."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dpoc.common.atomic import write_atomically
from dpoc.compiler.pipeline import build
from dpoc.contract.runs import TRACKER, folder_name
from dpoc.runtime.checkpoint import publish
from tests.conftest import RECIPES
from tests.runtime.synthetic import write_pairs
from tests.runtime.test_runtime_train import COMPARED
from tests.test_resume import Job, _no_job_left_running, _steps, _untimed, kill_mid_save  # noqa: F401 (its autouse cleanup)

STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return write_pairs(tmp_path_factory.mktemp("resume-lora-data") / "pairs", pairs=64)


def _build(where: Path, data: str, *overrides: str) -> tuple[Path, Path]:
    out, run = where / "build", where / "run"
    build(RECIPES / "tiny_cpu.yaml", [f"training.train_iters={STEPS}", "training.save_interval=2",
                                      f"dataset.output_prefix={data}", f"run_dir={run}", "lora.rank=4",
                                      "lora.alpha=8", "lora.targets=[q_proj,k_proj,v_proj,o_proj,down_proj]",
                                      *overrides],
          out=out)
    return out / "nodes" / "node-0.sh", run


@pytest.fixture(scope="module")
def once(tmp_path_factory, data) -> Path:
    """The run directory of the LoRA job run once, start to end, at dp2 (its checkpoints inside)."""
    where = tmp_path_factory.mktemp("resume-lora-once")
    script, run = _build(where, data)
    job = Job(script, where / "once.log")
    assert job.finish() == 0, job.text()[-3000:]
    assert len(_steps(run)) == STEPS
    return run


@pytest.mark.slow
def test_a_lora_job_killed_mid_save_resumes_exactly(tmp_path, data, once):
    uninterrupted = _steps(once)
    script, run = _build(tmp_path / "killed", data)
    save = run / "checkpoints"
    kill_mid_save(script, tmp_path / "1.log", 4, tmp_path / "paused")
    assert publish.iterations(save) == [2] and (save / TRACKER).read_text() == "2\n"
    job = Job(script, tmp_path / "2.log")
    assert job.finish() == 0, job.text()[-3000:]
    assert f"resumed from {save}/iter_0000002: iteration 2" in job.text()
    assert _untimed(_steps(run)) == _untimed(uninterrupted)


@pytest.mark.slow
def test_a_lora_checkpoint_saved_at_dp2_resumes_resharded_at_tp2(tmp_path, data, once):
    """The adapters (A replicated, B split on column-parallel linears; the other way on row-parallel ones) and
    their distributed-optimizer state reshard from dp2 to tp2 + sp; steps 5 and 6 follow the dp2 run's."""
    script, run = _build(tmp_path / "tp2", data, "parallelism.tp=2")
    save = run / "checkpoints"
    shutil.copytree(once / "checkpoints" / folder_name(4), save / folder_name(4))
    write_atomically(save / TRACKER, "4\n")
    job = Job(script, tmp_path / "tp2.log")
    assert job.finish() == 0, job.text()[-3000:]
    assert f"resumed from {save}/iter_0000004: iteration 4" in job.text()
    assert "layout: resharded from tp=1" in job.text()
    resumed, uninterrupted = _steps(run), _steps(once)
    assert [r["step"] for r in resumed] == [5, 6]
    for mine, theirs in zip(resumed, uninterrupted[4:], strict=True):
        for key in COMPARED:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (mine["step"], key)
