"""What sequence packing (`training.packing`) does to a step, as the runtime packs (dpoc/runtime/packing.py).

The runtime gives each micro-batch a token budget of 2 x micro_batch_size x seq_length (the rows of an
unpacked micro-batch at full length) and packs the step's pairs into the fewest budgets, a multiple of the
data-parallel size, each pair whole. Knowing only a mean (`uniform_packed_steps`), every sequence is
`mean_seq_length` tokens long, so each budget holds floor(budget / pair) pairs, and the step needs
B = ceil(pairs / per budget) budgets rounded up to a multiple of dp; knowing the histogram of pair sizes
(`lengths.LengthStats.packed`), the runtime's own packing of sampled global batches says B. Fill = real
tokens / (B x budget): how full the rows are. Memory holds micro-batches of at most one budget; compute runs
on the real tokens only (the stream is cut after its last sequence), attention per sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpoc.contract.plan import Layout, Training

SEQUENCES_PER_PAIR = 2


@dataclass(eq=False, repr=False)  # a result: not frozen, compared by identity, no repr (one method to compile)
class PackedSteps:
    """What packing makes of a step, on average."""
    micro_batches: float  # per data-parallel rank and step, on average
    pairs_per_micro_batch: float  # on average
    fill: float  # real tokens / (micro-batches x budget), the step's average
    budget: int  # tokens of one micro-batch's rows


def uniform_packed_steps(layout: Layout, training: Training, mean_seq_length: float) -> PackedSteps:
    budget = SEQUENCES_PER_PAIR * layout.micro_batch_size * training.seq_length
    pair = SEQUENCES_PER_PAIR * min(mean_seq_length, training.seq_length)
    per_budget = max(1, math.floor(budget / pair))
    bins = -(-math.ceil(layout.global_batch_size / per_budget) // layout.dp) * layout.dp
    pairs_per_micro_batch = layout.global_batch_size / bins
    return PackedSteps(micro_batches=bins // layout.dp, pairs_per_micro_batch=pairs_per_micro_batch,
                       fill=pairs_per_micro_batch * pair / budget, budget=budget)
