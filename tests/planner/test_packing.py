"""Packing in the planner: micro-batches, pairs and fill as the runtime packs, and what memory and
throughput make of them (toy dense model of conftest: h 8, 2 layers; one 4-token sequence of it costs
35328 training FLOPs, one micro-batch of a sequence holds 1728 bytes of activations per layer at s=4)."""

from __future__ import annotations

import pytest

from dpoc.planner.lengths import MeanLength
from dpoc.planner.memory import estimate_memory
from dpoc.planner.packing import uniform_packed_steps
from dpoc.planner.throughput import Efficiency, predict

EFFICIENCY = Efficiency(dense=0.5, experts=0.5)


def test_the_step_packs_whole_pairs_into_budgets_of_the_unpacked_micro_batch(specs):
    train = specs.training(64, dynamic_padding=True, packing=True)
    lay = specs.layout(1, gbs=8, mbs=2)
    # budget 2 x 2 x 64 = 256 tokens; pairs of 2 x 16 = 32 tokens: 8 per budget, one micro-batch, full
    steps = uniform_packed_steps(lay, train, 16)
    assert (steps.budget, steps.micro_batches, steps.pairs_per_micro_batch, steps.fill) == (256, 1, 8.0, 1.0)
    # pairs of 40 tokens: 6 per budget -> ceil(8 / 6) = 2 budgets of 4 pairs, 160 of 256 tokens
    steps = uniform_packed_steps(lay, train, 20)
    assert (steps.micro_batches, steps.pairs_per_micro_batch, steps.fill) == (2, 4.0, 0.625)
    # two data-parallel ranks: budgets in a multiple of 2, one each
    steps = uniform_packed_steps(specs.layout(2, gbs=8, mbs=2), train, 16)
    assert (steps.micro_batches, steps.pairs_per_micro_batch, steps.fill) == (1, 4.0, 0.5)
    # pairs of unknown length are full length: exactly the unpacked micro-batches
    steps = uniform_packed_steps(lay, train, 64)
    assert (steps.micro_batches, steps.fill) == (lay.num_microbatches, 1.0)


def test_memory_holds_fewer_micro_batches_at_the_fill(specs):
    # pp 4, one layer per stage, 8 micro-batches of one pair unpacked: stage 0 holds 4, one at the cap and
    # three at mean / seq_length (test_memory). Packed at a mean of 1.2 tokens: pairs of 2.4 tokens in
    # budgets of 2 x 1 x 4 = 8 -> 3 per budget, 3 micro-batches of 8/3 pairs, fill 0.8: stage 0 holds all
    # 3, one at the budget and two at the fill
    lay, model = specs.layout(4, pp=4, gbs=8, layers=4), specs.model(num_layers=4)
    dynamic, packed = specs.training(dynamic_padding=True), specs.training(dynamic_padding=True, packing=True)
    steps = uniform_packed_steps(lay, packed, 1.2)
    assert (steps.micro_batches, steps.fill) == (3, pytest.approx(0.8))
    unpacked = estimate_memory(model, specs.hardware(), lay, dynamic, MeanLength(1.2)).stages[0]
    assert unpacked.activations == pytest.approx((1 + 3 * 0.3) * 1728)
    held = estimate_memory(model, specs.hardware(), lay, packed, MeanLength(1.2)).stages[0]
    assert held.activations == pytest.approx((1 + 2 * 0.8) * 1728)
    assert estimate_memory(model, specs.hardware(), lay, packed, MeanLength(4)).stages[0].activations == 4 * 1728


def test_packed_steps_compute_the_real_tokens_in_fewer_micro_batches(specs):
    # one device at 1e6 FLOP/s, efficiency 0.5, 8 pairs of 4-token sequences (SEQ_FLOPS each, plus the
    # reference forward: 4/3) = 8 x 2 x 35328 x 4/3 / 5e5 = 1.507 s whether packed or not (no pipeline)
    hw = specs.hardware(devices_per_node=1, peak_tflops=1e-6)
    train, packed = specs.training(8, dynamic_padding=True), specs.training(8, dynamic_padding=True, packing=True)
    lay = specs.layout(1, gbs=8, mbs=1)
    step = 8 * 2 * 35328 * 4 / 3 / 5e5
    assert predict(specs.model(), hw, lay, train, EFFICIENCY, MeanLength(4)).step_s == pytest.approx(step)
    assert predict(specs.model(), hw, lay, packed, EFFICIENCY, MeanLength(4)).step_s == pytest.approx(step)
    # static padding pads each stream to its budget: at a mean of 3, pairs of 6 tokens, 2 per 16-token
    # budget, so 16 tokens are computed for every 12 real ones
    static = specs.training(8, packing=True)
    assert predict(specs.model(), hw, lay, static, EFFICIENCY, MeanLength(3)).step_s == pytest.approx(
        predict(specs.model(), hw, lay, packed, EFFICIENCY, MeanLength(3)).step_s * 16 / 12)
    # a 2-stage pipeline: packing's 4 micro-batches of 2 pairs leave a larger bubble than 8 of 1
    hw2 = specs.hardware(devices_per_node=2, peak_tflops=1e-6)
    pipe = specs.layout(2, pp=2, gbs=8, mbs=1)
    slow, fast = (predict(specs.model(), hw2, pipe, t, EFFICIENCY, MeanLength(4)) for t in (packed, train))
    assert slow.bubble_s == pytest.approx(2 * fast.bubble_s, rel=0.01)
