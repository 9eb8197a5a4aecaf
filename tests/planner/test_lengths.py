"""The planner's lengths from a preprocessing histogram: order statistics in closed form against brute force,
the runtime's sort-and-cut batching against a seeded simulation of it, and precomputed reference log-probs
dropping the reference from memory and time."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpoc.planner.lengths import Histogram, LengthStats, MeanLength
from dpoc.planner.memory import estimate_memory
from dpoc.planner.throughput import Efficiency, predict, predict_reference_pass
from dpoc.planner.workload import DPO_LIVE, DPO_PRECOMPUTED

HIST = Histogram((0, 100, 200, 300, 400, 800), (5, 40, 30, 0, 25))  # an empty bin, a wide tail bin


def _brute_force(hist: Histogram, n: int) -> tuple[np.ndarray, np.ndarray]:
    """E[X_(r)] and E[X_(r)^2] (r-th longest of n) by integrating Q(u) against U_(k)'s Beta(k, n-k+1) density
    on a fine midpoint grid: no closed form involved."""
    u = (np.arange(200_000) + 0.5) / 200_000
    q = np.array([hist.quantile(x) for x in u[::50]])
    q = np.interp(u, u[::50], q)  # Q is piecewise linear: exact up to the grid
    first, second = [], []
    for r in range(1, n + 1):
        k = n - r + 1
        log_density = (math.lgamma(n + 1) - math.lgamma(k) - math.lgamma(n - k + 1)
                       + (k - 1) * np.log(u) + (n - k) * np.log1p(-u))
        w = np.exp(log_density) / len(u)
        first.append((w * q).sum())
        second.append((w * q * q).sum())
    return np.array(first), np.array(second)


@pytest.mark.parametrize("n", [1, 2, 7, 32])
def test_order_statistics_match_brute_force_integration(n):
    first, second = HIST.order_statistics(n)
    want_first, want_second = _brute_force(HIST, n)
    assert np.allclose(first, want_first, rtol=2e-3)
    assert np.allclose(second, want_second, rtol=4e-3)
    assert list(first) == sorted(first, reverse=True)  # the longest first
    if n == 1:
        assert first[0] == pytest.approx(HIST.moments()[0])


def _stats(hist: Histogram) -> LengthStats:
    return LengthStats("test", hist.total, hist, Histogram(tuple(2 * e for e in hist.edges), hist.counts), hist,
                       hist.edges[-1] - 1)


@pytest.mark.parametrize(("dp", "mbs"), [(1, 2), (2, 2), (4, 1)])
def test_micro_batch_lengths_are_the_runtimes_sort_and_cut(specs, dp, mbs):
    """rank_micro_batches sorts a step's pairs longest first, cuts micro-batches of mbs, gives micro-batch k
    to rank k % dp and pads each to its first (longest) pair: simulated on seeded draws from the histogram."""
    gbs = 16
    layout = specs.layout(dp, gbs=gbs, mbs=mbs)
    training = specs.training(seq_length=800, dynamic_padding=True)
    rows = _stats(HIST).micro_batches(layout, training)
    rng = np.random.default_rng(0)
    quantile = np.vectorize(HIST.quantile)
    steps = -np.sort(-quantile(rng.random((20_000, gbs))), axis=1)  # each step sorted, longest first
    rank0_firsts = steps[:, [k * mbs for k in range(0, gbs // mbs, dp)]]
    assert np.allclose(rows.lengths, rank0_firsts.mean(axis=0), rtol=0.01)
    assert np.allclose(rows.squares, (rank0_firsts ** 2).mean(axis=0), rtol=0.02)
    assert rows.step_mean == pytest.approx(steps[:, ::mbs].mean(), rel=0.01)
    assert rows.peak == 799


def test_static_padding_and_a_mean_alone_keep_the_old_model(specs):
    layout = specs.layout(2, gbs=8, mbs=2)
    static = _stats(HIST).micro_batches(layout, specs.training(seq_length=800))
    assert static.lengths == (800.0,) * layout.num_microbatches and static.peak == 800
    mean = MeanLength(300).micro_batches(layout, specs.training(seq_length=800, dynamic_padding=True))
    assert mean.mean == 300 and mean.peak == 800


def test_precomputed_reference_holds_no_reference_and_runs_no_reference_forward(specs):
    m, hw = specs.model(num_layers=4), specs.hardware(devices_per_node=2)
    layout, training = specs.layout(2, pp=2, gbs=8, layers=4), specs.training()
    live = estimate_memory(m, hw, layout, training, MeanLength(4), DPO_LIVE)
    pre = estimate_memory(m, hw, layout, training, MeanLength(4), DPO_PRECOMPUTED)
    for a, b in zip(live.stages, pre.stages, strict=True):
        assert a.reference > 0 and b.reference == 0
        assert b.pipeline_buffers == pytest.approx(a.pipeline_buffers / 2)  # only the policy's hidden states
        assert b.total < a.total
    eff = Efficiency(0.5, 0.5)
    t_live = predict(m, hw, layout, training, eff, MeanLength(4), DPO_LIVE)
    t_pre = predict(m, hw, layout, training, eff, MeanLength(4), DPO_PRECOMPUTED)
    assert t_pre.compute_s == pytest.approx(t_live.compute_s * 3 / 4)  # fwd + bwd (3 forwards) of 4
    assert t_pre.mfu == t_pre.dpo_mfu
    one_pass = predict_reference_pass(m, hw, layout, training, eff, MeanLength(4), 4, 8)
    assert one_pass.pairs_per_s > t_pre.samples_per_s and one_pass.seconds is None
