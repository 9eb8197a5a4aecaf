"""bench/planner.py shows fitted rows as fitted: every calibration row is marked in-sample with what the fit took
from it, its leave-one-out error is a real prediction, and the error summary holds held-out rows only (the
Qwen3-30B-A3B pretrain row the experts' efficiency is fitted to has an error of 0 by construction)."""

from __future__ import annotations

import pytest

from bench.planner import calibration_report


@pytest.fixture(scope="module")
def report():
    return calibration_report()


def test_every_calibration_row_is_marked_in_sample_and_the_dpo_rows_held_out(report):
    assert all(r["in_sample"] is True for r in report["calibration"])
    assert all(r["in_sample"] is False for r in report["held_out_dpo"])
    moe = next(r for r in report["calibration"] if r["case"] == "Qwen3-30B-A3B pretrain 4K, A2 2x8")
    assert abs(moe["error"]) < 1e-9 and "error is 0 by construction" in moe["fitted"]
    assert abs(moe["leave_one_out_error"]) > 0.05  # without it, the experts run at the dense efficiency


def test_the_error_summary_holds_held_out_rows_only(report):
    summary = report["error_summary"]
    held = [r["error"] for r in report["held_out_dpo"]]
    left_out = [r["leave_one_out_error"] for r in report["calibration"]]
    assert summary["held_out_dpo"]["rows"] == len(held)
    assert summary["held_out_dpo"]["worst"] == max(held, key=abs)
    assert summary["calibration_left_out"]["worst"] == max(left_out, key=abs)
    assert min(abs(e) for e in left_out) > 1e-6  # no fitted-to-zero row among them
