"""`dpoc report RUN_DIR`: curves from metrics.jsonl to a PNG, and clear errors."""

from __future__ import annotations

import argparse
import json

import pytest

from dpoc.cli import report
from dpoc.contract.errors import DpocError


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    return report.run(parser.parse_args(list(argv)))


def test_draws_the_three_curves(tmp_path, capsys):
    lines = [{"step": s, "loss": 0.7 - 0.1 * s, "rewards/margins": 0.2 * s, "rewards/accuracies": 0.25 * s}
             for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert _run(str(tmp_path)) == 0
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (800, 800)
    assert capsys.readouterr().out == (f"{tmp_path}/report.png: loss 0.6000 -> 0.4000, accuracy 0.750, "
                                       "margin 0.6000 at step 3\n")
    assert not list(tmp_path.glob(".*partial"))


def test_draws_the_panels_of_the_metrics_a_loss_logs(tmp_path, capsys):
    """ORPO's run logs nll_loss and log_odds_ratio besides the rewards: 7 panels; a bare loss: 1."""
    keys = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "logps/chosen",
            "logps/rejected", "nll_loss", "log_odds_ratio")
    lines = [{"step": s, **{k: 0.1 * s for k in keys}} for s in (1, 2)]
    assert [label for _, label in report.present(lines)] == [
        "loss", "reward margin (chosen - rejected)", "reward accuracy", "rewards", "sequence log-probs",
        "chosen NLL", "log sigmoid(log-odds ratio)"]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert _run(str(tmp_path)) == 0
    png = (tmp_path / "report.png").read_bytes()
    assert int.from_bytes(png[20:24], "big") == 8 * 7 * 100 // 3
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    assert _run(str(bare)) == 0
    assert capsys.readouterr().out.endswith(f"{bare}/report.png: loss 0.5000 -> 0.5000 at step 1\n")


def test_missing_metrics_and_bad_lines_are_named(tmp_path):
    with pytest.raises(DpocError) as err:
        _run(str(tmp_path))
    assert str(err.value) == (f"{tmp_path}/metrics.jsonl: file: no metrics here (valid: a run directory the "
                              "runtime wrote, e.g. runs/<recipe name>)")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "rewards/margins": 0.69}\n')
    with pytest.raises(DpocError) as err:
        _run(str(tmp_path))
    assert str(err.value) == f"{tmp_path}/metrics.jsonl: line 1: missing loss"
