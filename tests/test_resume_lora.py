"""A LoRA job (the tiny recipe with a lora section, 2 gloo processes through its node script) killed with SIGKILL
in the middle of a save and started again logs exactly the steps of an uninterrupted run, bit for bit: its
adapter-only checkpoints, their optimizer state, RNG and data position are all a resume needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpoc.compiler.pipeline import build
from dpoc.contract.runs import TRACKER
from dpoc.runtime.checkpoint import publish
from tests.conftest import RECIPES
from tests.runtime.synthetic import write_pairs
from tests.test_resume import Job, _no_job_left_running, _steps, _untimed, kill_mid_save  # noqa: F401 (its autouse cleanup)

STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return write_pairs(tmp_path_factory.mktemp("resume-lora-data") / "pairs", pairs=64)


def _build(where: Path, data: str) -> tuple[Path, Path]:
    out, run = where / "build", where / "run"
    build(RECIPES / "tiny_cpu.yaml", [f"training.train_iters={STEPS}", "training.save_interval=2",
                                      f"dataset.output_prefix={data}", f"run_dir={run}", "lora.rank=4",
                                      "lora.alpha=8", "lora.targets=[q_proj,k_proj,v_proj,o_proj,down_proj]"],
          out=out)
    return out / "nodes" / "node-0.sh", run


@pytest.mark.slow
def test_a_lora_job_killed_mid_save_resumes_exactly(tmp_path, data):
    script, run = _build(tmp_path / "once", data)
    job = Job(script, tmp_path / "once.log")
    assert job.finish() == 0, job.text()[-3000:]
    uninterrupted = _steps(run)
    assert len(uninterrupted) == STEPS

    script, run = _build(tmp_path / "killed", data)
    save = run / "checkpoints"
    kill_mid_save(script, tmp_path / "1.log", 4, tmp_path / "paused")
    assert publish.iterations(save) == [2] and (save / TRACKER).read_text() == "2\n"
    job = Job(script, tmp_path / "2.log")
    assert job.finish() == 0, job.text()[-3000:]
    assert f"resumed from {save}/iter_0000002: iteration 2" in job.text()
    assert _untimed(_steps(run)) == _untimed(uninterrupted)
