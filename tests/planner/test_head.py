"""The response-only LM head in the planner: the dataset's prompt / response split sets the positions whose
logits the memory model holds and whose head FLOPs the throughput model counts; unknown, every position. Only
a target whose head runs on the response (`Traits.response_head`: the dpoc runtime) gets the share;
MindSpeed-RL's head runs on every position whatever the split."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dpoc.compiler.render import targets
from dpoc.planner.features import DPOC_CPU, GLOBAL_BATCH, NO_FEATURES, SORT_AND_CUT, Traits
from dpoc.planner.head import head_fraction
from dpoc.planner.lengths import Histogram, LengthStats, MeanLength
from dpoc.planner.memory import estimate_memory
from dpoc.planner.throughput import Efficiency, predict


def stats(responses: tuple[int, ...] | None) -> LengthStats:
    """10 pairs with their longer side in [0, 2) and 30 in [2, 4) tokens (seq_length 4); `responses`: the
    response tokens (both sides) of each bin's pairs."""
    longer = Histogram((0, 2, 4), (10, 30))
    return LengthStats("t", 40, longer, Histogram((0, 4, 8), (10, 30)), longer, 3, responses)


def test_the_head_runs_on_the_response_share_of_a_row(specs):
    split = stats((10, 120))  # 0.5 response tokens per sequence in the short bin, 2 in the long one
    padded, dynamic = specs.training(seq_length=4), specs.training(seq_length=4, dynamic_padding=True)
    assert head_fraction(split, padded, 4, True) == pytest.approx(130 / 80 / 4)  # the dataset's mean over seq_length
    assert head_fraction(split, dynamic, 3, True) == pytest.approx(2 / 3)  # pairs as long as the row
    assert head_fraction(split, dynamic, 1, True) == pytest.approx(0.5)
    # nothing known: every position, as before the runtime's response-only head
    assert head_fraction(stats(None), dynamic, 3, True) == head_fraction(MeanLength(3), dynamic, 3, True) == 1.0
    # a head over every position (MindSpeed-RL's) runs on the whole row whatever the split
    assert head_fraction(split, padded, 4, False) == head_fraction(split, dynamic, 1, False) == 1.0


def test_each_target_says_where_its_head_runs(specs):
    hw = specs.hardware()
    assert targets.get("dpoc").traits(hw).response_head is True  # runtime/model/gpt.py: response positions
    assert targets.get("mindspeed-rl").traits(hw).response_head is False  # the whole sequence's logits
    assert DPOC_CPU.response_head is True


def test_logits_and_head_input_are_held_for_the_response_positions(specs):
    train = specs.training(seq_length=4)
    (full,) = estimate_memory(specs.model(), specs.hardware(), specs.layout(1), train, stats(None)).stages
    (split,) = estimate_memory(specs.model(), specs.hardware(), specs.layout(1), train, stats((10, 120))).stages
    share = 130 / 80 / 4
    assert full.logits == 8 * 32 * (2 + 4)  # 2 sequences x 4 tokens, vocab 32: bf16 logits and fp32 softmax
    assert split.logits == pytest.approx(share * full.logits)
    # the final norm's input over every position, the head's over its positions (bf16, h 8)
    assert full.activations - split.activations == pytest.approx((1 - share) * 8 * 2 * 8)


def test_head_flops_cover_the_response_positions_and_mfu_the_convention(specs):
    hw, lay, train = specs.hardware(devices_per_node=1, peak_tflops=1e-6), specs.layout(1, gbs=2), specs.training()
    full = predict(specs.model(), hw, lay, train, Efficiency(0.5, 0.5), stats(None))
    split = predict(specs.model(), hw, lay, train, Efficiency(0.5, 0.5), stats((10, 120)))
    # the head: 2 x h 8 x vocab 32 FLOPs a position, 8 positions a micro-batch, policy (3) + reference (1)
    # forward units, 2 micro-batches, at 0.5 x 1e6 FLOP/s
    head_s = 2 * 8 * 32 * 8 * 4 * 2 / 0.5e6
    assert full.step_s - split.step_s == pytest.approx((1 - 130 / 80 / 4) * head_s)
    assert split.mfu * split.step_s == pytest.approx(full.mfu * full.step_s)  # the same model FLOPs


# the dpoc runtime's batching with MindSpeed-RL's head: only where the head runs differs
EVERY_POSITION = Traits("every-position", SORT_AND_CUT, NO_FEATURES, response_head=False)


def test_a_head_over_every_position_holds_every_position_s_logits(specs):
    train, split = specs.training(seq_length=4), stats((10, 120))
    (full,) = estimate_memory(specs.model(), specs.hardware(), specs.layout(1), train, stats(None)).stages
    (every,) = estimate_memory(specs.model(), specs.hardware(), specs.layout(1), train, split,
                               traits=EVERY_POSITION).stages
    assert every.logits == full.logits == 8 * 32 * (2 + 4)  # 8 positions, vocab 32: bf16 logits + fp32 softmax
    assert every.activations == full.activations


def test_a_head_over_every_position_costs_every_position_s_flops(specs):
    hw, lay, train = specs.hardware(devices_per_node=1, peak_tflops=1e-6), specs.layout(1, gbs=2), specs.training()
    split = stats((10, 120))
    response = predict(specs.model(), hw, lay, train, Efficiency(0.5, 0.5), split)
    every = predict(specs.model(), hw, lay, train, Efficiency(0.5, 0.5), split, traits=EVERY_POSITION)
    head_s = 2 * 8 * 32 * 8 * 4 * 2 / 0.5e6  # as above: the head's FLOPs over all 8 positions, 4 units, 2 mbs
    assert every.step_s - response.step_s == pytest.approx((1 - 130 / 80 / 4) * head_s)
    assert every.step_s == pytest.approx(predict(specs.model(), hw, lay, train, Efficiency(0.5, 0.5),
                                                 stats(None)).step_s)


def test_mindspeed_rl_plans_the_head_over_every_position(specs):
    """The MindSpeed-RL target's own traits, not a hand-made one: its logits ignore the split."""
    train, split = specs.training(seq_length=4), stats((10, 120))
    mindspeed = replace(targets.get("mindspeed-rl").traits(specs.hardware()), batching=SORT_AND_CUT)
    (own,) = estimate_memory(specs.model(), specs.hardware(), specs.layout(1), train, split, traits=mindspeed).stages
    (dpoc,) = estimate_memory(specs.model(), specs.hardware(), specs.layout(1), train, split).stages
    assert own.logits == 8 * 32 * (2 + 4)
    assert dpoc.logits == pytest.approx(130 / 80 / 4 * own.logits)
    assert targets.get("mindspeed-rl").traits(specs.hardware()).batching == GLOBAL_BATCH
