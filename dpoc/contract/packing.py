"""Sequence packing (`--dpoc-packing`): which pairs share a micro-batch, which then is one token stream.

A packed micro-batch is megatron's `thd` format: its sequences laid end to end in one stream [1, t] with
`PackedSequences` (cumulative lengths) for the kernels. Its token budget is what an unpacked micro-batch
may hold, 2 x micro-batch-size x seq_length tokens (the rows of `--micro-batch-size` pairs at full length),
so the planner's activation memory for a micro-batch stays an upper bound; any pair fits in one budget.
Position ids restart at each sequence (megatron's thd rotary embedding restarts at each boundary too),
attention never crosses a sequence (attention.py), and a pair's two sequences sit in the same micro-batch,
so the loss pairs them up: the stream holds the chosen sequences, then the rejected ones, in the order
`dpo.Objective` reads rows [chosen_1..n, rejected_1..n].

Which pairs share a micro-batch is decided per step over the whole global batch (the same pairs, in the
same order, whatever the layout): the pairs, largest first, each go to the least-filled of B bins, B the
smallest multiple of the data-parallel size for which every pair fits (so every rank runs the same number
of micro-batches, as expert parallelism's all-to-all requires, and the bins stay balanced). Bin k goes to
data-parallel rank k % dp. Fill = real tokens / (B x budget).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence


def pack_pairs(sizes: Sequence[int], capacity: int, bins_multiple_of: int = 1) -> list[list[int]]:
    """Indices into `sizes` per bin, bins ordered by load (fullest first), each bin's pairs in placement
    order. Every size must be <= capacity. Deterministic: ties go to the earlier pair and the earlier bin."""
    if max(sizes) > capacity:
        raise ValueError(f"a pair of {max(sizes)} tokens exceeds the {capacity}-token budget")
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins = max(1, math.ceil(sum(sizes) / capacity))
    bins = -(-bins // bins_multiple_of) * bins_multiple_of
    while True:
        placed = _least_filled_first(sizes, order, capacity, bins)
        if placed is not None:
            return placed
        bins += bins_multiple_of


def _least_filled_first(sizes: Sequence[int], order: list[int], capacity: int, bins: int
                        ) -> list[list[int]] | None:
    heap = [(0, b) for b in range(bins)]  # (load, bin)
    contents: list[list[int]] = [[] for _ in range(bins)]
    for i in order:
        load, b = heapq.heappop(heap)
        if load + sizes[i] > capacity:  # the least-filled bin has the most room: no bin fits
            return None
        contents[b].append(i)
        heapq.heappush(heap, (load + sizes[i], b))
    loads = [sum(sizes[i] for i in c) for c in contents]
    return [contents[b] for b in sorted(range(bins), key=lambda b: (-loads[b], b))]
