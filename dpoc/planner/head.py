"""The share of a micro-batch's positions a target's LM head runs on.

The runtime projects through the output layer, and takes the cross entropy of, only the positions that predict
a response token (`runtime/model/gpt.py::ResponseLogitsGPTModel`): a sequence's response tokens, neither its
prompt nor its padding. So the head's logits (memory) and its FLOPs scale with the response tokens, not the
padded length. The dataset's stats say how many there are for pairs of each padded length
(`pair_histogram.longer_response_tokens`); unknown (a mean length, or older stats), every position counts.
A target whose head runs on every position (MindSpeed-RL: `Traits.response_head` False) counts every one.
"""

from __future__ import annotations

from bisect import bisect_right

from dpoc.contract.plan import Training
from dpoc.planner.lengths import Lengths, LengthStats


def mean_response_tokens(stats: LengthStats, row_length: float | None = None) -> float:
    """Mean response tokens per sequence: of the pairs whose longer side falls in `row_length`'s bin (a
    micro-batch padded to its first pair), or of the whole dataset (None)."""
    counts, responses = stats.longer.counts, stats.response_tokens
    if row_length is not None:
        edges = stats.longer.edges
        index = min(max(bisect_right(edges, row_length) - 1, 0), len(counts) - 1)
        while index > 0 and not counts[index]:  # past the longest pair: the longest bin with pairs
            index -= 1
        if counts[index]:
            return responses[index] / (2 * counts[index])
    return sum(responses) / (2 * sum(counts))


def head_fraction(lengths: Lengths | None, training: Training, row_length: float, response_head: bool) -> float:
    """Of a micro-batch's `row_length` positions per sequence, the share the head runs on. A target whose head
    runs on every position (`response_head` False, `features.Traits`): all of them. Else: with dynamic
    padding, the response tokens of pairs of that length; padded to seq_length or packed, the dataset's mean
    response over the row (packed rows: over the mean sequence, whose tokens fill the stream)."""
    if not response_head or not isinstance(lengths, LengthStats) or lengths.response_tokens is None:
        return 1.0
    if training.packing:
        return min(1.0, mean_response_tokens(lengths) / lengths.sequences.moments()[0])
    by_length = row_length if training.dynamic_padding else None
    return min(1.0, mean_response_tokens(lengths, by_length) / row_length)
