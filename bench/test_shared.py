"""The one timer and matmul-rate probe the benchmarks share (bench/_shared.py)."""

from __future__ import annotations

import time

from bench._shared import best_seconds, square_matmul_rate


def test_best_seconds_warms_up_once_then_keeps_the_fastest_call():
    pauses = iter([0.2, 0.06, 0.01, 0.04])  # the warm-up's 0.2 s is never counted
    calls = []

    def work():
        calls.append(1)
        time.sleep(next(pauses))

    best = best_seconds(work, 3)
    assert len(calls) == 4
    assert 0.01 <= best < 0.04


def test_square_matmul_rate_counts_two_flops_per_multiply_add(monkeypatch):
    import bench._shared as shared

    monkeypatch.setattr(shared, "best_seconds", lambda work, repeats, device: (work(), 0.5)[1])
    assert square_matmul_rate(64, 3) == 2 * 64**3 / 0.5
