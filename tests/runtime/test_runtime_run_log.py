"""The run log after a resume: metrics.jsonl keeps each step once."""

from __future__ import annotations

import json

from dpoc.runtime.step.run_log import RunLog

ROW = {"loss": 0.5, "rewards/accuracies": 1.0, "rewards/margins": 0.1, "lr": 1e-3, "grad_norm": 1.0,
       "samples_per_s": 1.0, "tokens_per_s": 1.0}


def test_resuming_at_step_k_drops_the_rows_after_k(tmp_path):
    log = RunLog(str(tmp_path), total_steps=6, first_step=0, tensorboard_dir=None)
    for step in range(1, 6):  # an interrupted run logged five steps; its last checkpoint is step 3
        log.step({"step": step, **ROW})
    log.close()
    log = RunLog(str(tmp_path), total_steps=6, first_step=3, tensorboard_dir=None)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    for step in (4, 5, 6):
        log.step({"step": step, **ROW})
    log.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        [1, 2, 3, 4, 5, 6]
    assert len((tmp_path / "train.log").read_text().splitlines()) == 8  # the human log keeps everything
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "train.log"]  # no temporary left
