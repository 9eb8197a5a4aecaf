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


def test_the_long_sequence_llama2_rows_are_held_out_as_mindspeed_llm_ran_them(report):
    """MindSpeed-LLM's offline DPO pads every sequence to seq_length and runs the head over every position: the
    rows need no length assumption, and they are predicted, never fitted (the calibration set is pretraining
    only)."""
    rows = {r["case"]: r for r in report["held_out_dpo"]}
    short, long = rows["LLaMA2-7B DPO 16K, A2 1x8, TP8 PP1 DP1"], rows["LLaMA2-7B DPO 32K, A2 2x8, TP8 PP2 DP1"]
    for row in (short, long):
        assert (row["runner"], row["batching"], row["in_sample"]) == ("mindspeed-llm", "padded-to-seq-length", False)
        assert row["predicted"] == row["predicted_if_padded_to_seq_length"]  # padded as it ran
    assert (short["measured"], long["measured"]) == (0.442, 0.227)
    assert all("DPO" not in r["case"] for r in report["calibration"])
    assert abs(short["error"]) < 0.25


@pytest.mark.xfail(strict=True, reason="issue 18 item 5: the 32K row is predicted +39% (0.315 of 0.227 pairs/s); "
                   "its cause is not found (the model's terms match the 16K row of the same table within 2%)")
def test_the_32k_llama2_row_is_predicted_within_25_percent(report):
    row = next(r for r in report["held_out_dpo"] if r["case"] == "LLaMA2-7B DPO 32K, A2 2x8, TP8 PP2 DP1")
    assert abs(row["error"]) < 0.25
