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


def test_missing_metrics_and_bad_lines_are_named(tmp_path):
    with pytest.raises(DpocError) as err:
        _run(str(tmp_path))
    assert str(err.value) == (f"{tmp_path}/metrics.jsonl: file: no metrics here (valid: a run directory the "
                              "runtime wrote, e.g. runs/<recipe name>)")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    with pytest.raises(DpocError) as err:
        _run(str(tmp_path))
    assert str(err.value) == f"{tmp_path}/metrics.jsonl: line 1: missing rewards/margins, rewards/accuracies"
