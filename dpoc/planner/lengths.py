"""Sequence lengths as the planner knows them, and what the runtime's batching makes of them.

Two sources. One mean (`training.mean_seq_length`: a micro-batch's mean padded tokens per sequence, with
packing the real mean; default `seq_length`, when nothing is known: every micro-batch full), or a
preprocessing `_stats.json` (`training.length_stats`, read by `dpoc.compiler.load`): per pair, the histogram of its
longer side (what its rows are padded to) with its bins' response tokens (the LM head's positions: `head`) and
of both sides' tokens (what it takes in a packed stream), and
the histogram of every sequence's length (attention's s^2 work). Within a bin, lengths are taken as uniform.

Dynamic padding, as `runtime/data.py::rank_micro_batches` does it: a step's G pairs, sorted longest first,
cut into micro-batches of b consecutive pairs, each padded to its first pair's longer side rounded up to
m = tp * cp; micro-batch k goes to data-parallel rank k % dp, so rank 0 runs the longest micro-batch of
every round of dp, and every step waits for it. Its j-th micro-batch starts at the (j dp b + 1)-th longest
pair of the step, whose expected length is an order statistic of G draws from the histogram: closed form
(`order_statistics`), no sampling. The interleaved pipeline pads a rank's micro-batches to its longest.
Packing (`packed`) runs the runtime's own `pack_pairs` on pair sizes drawn by a seeded generator.

MindSpeed-RL's batching (`GLOBAL_BATCH`): its DPO loader reads a global batch of G pairs at a time and its
collator pads them all to the longest sequence, a multiple of 8 (`mindspeed_rl/datasets/dataloader.py`,
`PairwiseDataCollatorWithPadding(pad_to_multiple_of=8)`), which MindSpeed-LLM then needs to be a multiple of
tp * cp: every micro-batch of a step is as long as the expected longest of the step's 2 G sequences (the
longest of G pairs' longer sides), rounded up to lcm(8, tp * cp). The step holding the dataset's longest pair
holds every in-flight micro-batch at that length (`MicroBatchLengths.together`).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

from dpoc.contract.errors import DpocError, Problem
from dpoc.contract.plan import Layout, Training
from dpoc.planner.features import GLOBAL_BATCH, SORT_AND_CUT
from dpoc.planner.packing import SEQUENCES_PER_PAIR, PackedSteps, uniform_packed_steps

PACKING_SAMPLE_PAIRS = 4096  # pairs drawn to estimate packing (at least 4 global batches)
PACKING_SEED = 0
GLOBAL_BATCH_MULTIPLE = 8  # MindSpeed-RL's collator: pad_to_multiple_of=8


@dataclass(frozen=True)
class Histogram:
    """Counts of lengths in [edges[i], edges[i+1]), taken as uniform within each bin."""

    edges: tuple[int, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)

    @cached_property
    def _segments(self) -> tuple[tuple[float, float, float, float], ...]:
        """(u_start, u_end, A, B) per non-empty bin: the quantile function is A + B u on [u_start, u_end]."""
        out, done = [], 0
        for lo, hi, count in zip(self.edges, self.edges[1:], self.counts, strict=False):
            if count:
                a, b = done / self.total, (done + count) / self.total
                slope = (hi - lo) / (b - a)
                out.append((a, b, lo - slope * a, slope))
                done += count
        return tuple(out)

    def moments(self) -> tuple[float, float]:
        """(E[L], E[L^2])."""
        mean = square = 0.0
        for lo, hi, count in zip(self.edges, self.edges[1:], self.counts, strict=False):
            p = count / self.total
            mean += p * (lo + hi) / 2
            square += p * (lo * lo + lo * hi + hi * hi) / 3
        return mean, square

    def quantile(self, u: float) -> float:
        for start, end, a, b in self._segments:
            if u <= end:
                return a + b * max(u, start)
        return float(self.edges[-1])

    def order_statistics(self, draws: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(E[X_(r)], E[X_(r)^2]) for r = 1..draws, X_(r) the r-th longest of `draws` independent lengths."""
        return _order_statistics(self, draws)


@lru_cache(maxsize=64)
def _order_statistics(hist: Histogram, n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """X_(k) ascending is Q(U_(k)) with U_(k) ~ Beta(k, n - k + 1) and Q = A + B u on each segment, so

        E[X_(k)]   = sum_seg A P_n(k) + B k/(n+1) P_{n+1}(k+1)
        E[X_(k)^2] = sum_seg A^2 P_n(k) + 2AB k/(n+1) P_{n+1}(k+1) + B^2 k(k+1)/((n+1)(n+2)) P_{n+2}(k+2)

    where P_m(j) = P(U_(j) of m uniforms lies in the segment) = P(Bin(m, u_end) >= j) - P(Bin(m, u_start) >= j)
    (u^i times the Beta(k, n-k+1) density is a multiple of the Beta(k+i, n-k+1) density)."""
    first = [0.0] * (n + 1)
    second = [0.0] * (n + 1)
    known: dict[tuple[int, float], list[float]] = {}  # consecutive segments share a boundary: each tail once

    def tail(m: int, u: float) -> list[float]:
        if (m, u) not in known:
            known[m, u] = _tails(m, u)
        return known[m, u]

    for start, end, a, b in hist._segments:
        tails = [(tail(m, end), tail(m, start)) for m in (n, n + 1, n + 2)]
        for k in range(1, n + 1):
            p0 = tails[0][0][k] - tails[0][1][k]
            p1 = tails[1][0][k + 1] - tails[1][1][k + 1]
            p2 = tails[2][0][k + 2] - tails[2][1][k + 2]
            c1, c2 = k / (n + 1), k * (k + 1) / ((n + 1) * (n + 2))
            first[k] += a * p0 + b * c1 * p1
            second[k] += a * a * p0 + 2 * a * b * c1 * p1 + b * b * c2 * p2
    # descending: the r-th longest is the (n - r + 1)-th shortest
    return tuple(first[n - r + 1] for r in range(1, n + 1)), tuple(second[n - r + 1] for r in range(1, n + 1))


def _tails(n: int, u: float) -> list[float]:
    """P(Bin(n, u) >= j) for j = 0..n+1; the pmf from its mode outwards, so nothing underflows before it."""
    if u <= 0.0:
        return [1.0] + [0.0] * (n + 1)
    if u >= 1.0:
        return [1.0] * (n + 1) + [0.0]
    mode = min(n, int((n + 1) * u))
    pmf = [0.0] * (n + 1)
    pmf[mode] = math.exp(math.lgamma(n + 1) - math.lgamma(mode + 1) - math.lgamma(n - mode + 1)
                         + mode * math.log(u) + (n - mode) * math.log1p(-u))
    odds = u / (1.0 - u)
    for j in range(mode, n):
        pmf[j + 1] = pmf[j] * (n - j) / (j + 1) * odds
    for j in range(mode, 0, -1):
        pmf[j - 1] = pmf[j] * j / ((n - j + 1) * odds)
    tails = [0.0] * (n + 2)
    for j in range(n, -1, -1):
        tails[j] = tails[j + 1] + pmf[j]
    return tails


def _rounded(mean: float, square: float, multiple: int) -> tuple[float, float]:
    """(E[R], E[R^2]) of R = X rounded up to a multiple of m, its remainder taken as uniform on 0..m-1."""
    pad = (multiple - 1) / 2
    return mean + pad, square + 2 * pad * mean + (multiple - 1) * (2 * multiple - 1) / 6


@dataclass(eq=False, repr=False)  # a result: not frozen, compared by identity, no repr (one method to compile)
class MicroBatchLengths:
    """Padded tokens per sequence of the slowest data-parallel rank's micro-batches (rank 0's), in the order
    it runs them, as expected values (and their squares: attention's s^2); the mean over all micro-batches of
    the step (every rank's: the FLOPs done); and `peak`, a bound no micro-batch exceeds (the memory plan)."""

    lengths: tuple[float, ...]
    squares: tuple[float, ...]
    peak: float
    step_mean: float
    step_square: float
    together: bool = False  # every micro-batch of a step padded alike: memory holds all of them at the peak

    @property
    def mean(self) -> float:
        return sum(self.lengths) / len(self.lengths)

    @property
    def mean_square(self) -> float:
        return sum(self.squares) / len(self.squares)


class MeanLength:
    """Every micro-batch's sequences are `mean` tokens on average (after padding; packed: real tokens), and
    a micro-batch may be `seq_length` long: one number, no distribution."""

    def __init__(self, mean: float):
        self.mean = float(mean)

    def micro_batches(self, layout: Layout, training: Training, batching: str = SORT_AND_CUT) -> MicroBatchLengths:
        m = layout.num_microbatches
        length = self.mean if training.dynamic_padding else float(training.seq_length)
        return MicroBatchLengths((length,) * m, (length * length,) * m, self.peak(layout, training), length,
                                 length * length, together=batching == GLOBAL_BATCH)

    def peak(self, layout: Layout, training: Training) -> float:
        """The longest a micro-batch's rows can be: unknown, so `seq_length`."""
        return float(training.seq_length)

    def sorted_dataset(self, multiple: int) -> tuple[float, float]:
        """(E[padded length], E[its square]) per sequence when the whole dataset is sorted by length first."""
        return self.mean, self.mean * self.mean

    def sequence_moments(self) -> tuple[float, float]:
        """(E[L], E[L^2]) of one real (unpadded) sequence."""
        return self.mean, self.mean * self.mean

    def packed(self, layout: Layout, training: Training) -> PackedSteps:
        return uniform_packed_steps(layout, training, self.mean)

    @property
    def pairs(self) -> int | None:
        return None

    def summary(self) -> dict[str, Any]:
        return {"kind": "mean", "mean_seq_length": self.mean}

    def text(self) -> str:
        return f"mean {self.mean:g} tokens/sequence"


@dataclass(frozen=True)
class LengthStats:
    """A preprocessing `_stats.json`'s length histograms (`training.length_stats`)."""

    source: str  # the file, as the recipe names it
    pairs: int
    longer: Histogram  # per pair, its longer side: the length its rows are padded to
    pair_tokens: Histogram  # per pair, chosen + rejected tokens: its size in a packed stream
    sequences: Histogram  # every sequence (chosen and rejected)
    longest: int  # the longest sequence
    # per bin of `longer`, the response tokens (chosen + rejected) of its pairs; None: not recorded (older stats)
    response_tokens: tuple[int, ...] | None = None

    def micro_batches(self, layout: Layout, training: Training, batching: str = SORT_AND_CUT) -> MicroBatchLengths:
        m = layout.num_microbatches
        if not training.dynamic_padding:
            length = float(training.seq_length)
            return MicroBatchLengths((length,) * m, (length * length,) * m, length, length, length * length)
        multiple = layout.tp * layout.cp
        firsts, squares = self.longer.order_statistics(layout.global_batch_size)
        peak = self.peak(layout, training)
        if batching == GLOBAL_BATCH:
            multiple = math.lcm(GLOBAL_BATCH_MULTIPLE, multiple)
            length, square = _rounded(firsts[0], squares[0], multiple)
            peak = float(min(training.seq_length, math.ceil(self.longest / multiple) * multiple))
            return MicroBatchLengths((length,) * m, (square,) * m, peak, length, square, together=True)
        b, dp = layout.micro_batch_size, layout.dp
        # micro-batch k of the step starts at its (k b + 1)-th longest pair and goes to rank k % dp; the
        # interleaved pipeline pads every micro-batch of a rank to the rank's longest, its first
        same = layout.pp > 1 and layout.vpp > 1
        starts = [(k % dp if same else k) * b for k in range(m * dp)]
        padded = [_rounded(firsts[r], squares[r], multiple) for r in starts]
        rank0 = padded[::dp]
        return MicroBatchLengths(tuple(p[0] for p in rank0), tuple(p[1] for p in rank0), peak,
                                 sum(p[0] for p in padded) / len(padded), sum(p[1] for p in padded) / len(padded))

    def peak(self, layout: Layout, training: Training) -> float:
        """The longest a micro-batch's rows can be: the dataset's longest sequence (rounded up to tp * cp)."""
        if not training.dynamic_padding:
            return float(training.seq_length)
        multiple = layout.tp * layout.cp
        return float(min(training.seq_length, math.ceil(self.longest / multiple) * multiple))

    def sorted_dataset(self, multiple: int) -> tuple[float, float]:
        return _rounded(*self.longer.moments(), multiple)

    def sequence_moments(self) -> tuple[float, float]:
        return self.sequences.moments()

    def packed(self, layout: Layout, training: Training) -> PackedSteps:
        budget = SEQUENCES_PER_PAIR * layout.micro_batch_size * training.seq_length
        return _sampled_packing(self.pair_tokens, layout.global_batch_size, budget, layout.dp, training.seq_length)

    def summary(self) -> dict[str, Any]:
        mean, _ = self.longer.moments()
        return {"kind": "histogram", "source": self.source, "pairs": self.pairs, "longest": self.longest,
                "mean_longer_side": round(mean, 2), "mean_sequence": round(self.sequences.moments()[0], 2)}

    def text(self) -> str:
        return (f"lengths of {self.source} ({self.pairs} pairs, longer side {self.longer.moments()[0]:.0f} "
                f"tokens on average)")


Lengths = MeanLength | LengthStats


@lru_cache(maxsize=256)
def _sampled_packing(tokens: Histogram, global_batch: int, budget: int, dp: int, seq_length: int) -> PackedSteps:
    """The runtime's packing of global batches of pair sizes drawn from `tokens` (seeded: the same answer every
    time), averaged over the batches."""
    from dpoc.contract.packing import pack_pairs

    rng = random.Random(PACKING_SEED)
    batches = max(4, -(-PACKING_SAMPLE_PAIRS // global_batch))
    bins = real = 0
    cap = min(budget, 2 * (seq_length - 1))
    for _ in range(batches):
        sizes = [min(cap, max(2, round(tokens.quantile(rng.random())))) for _ in range(global_batch)]
        bins += len(pack_pairs(sizes, budget, dp))
        real += sum(sizes)
    return PackedSteps(micro_batches=bins / batches / dp, pairs_per_micro_batch=global_batch * batches / bins,
                       fill=real / (bins * budget), budget=budget)


def parse_stats(data: Any, source: str) -> LengthStats:
    """The histograms of a `_stats.json` (dpoc preprocess writes it); `source` names the file in problems."""
    def problem(field: str, message: str) -> DpocError:
        return DpocError([Problem(source, field, f"{message} (valid: the {{prefix}}_stats.json that dpoc "
                                  "preprocess writes; re-run the build's preprocess.sh if it is older)")])

    if not isinstance(data, dict):
        raise problem("(file)", "is not a JSON object")
    pair = data.get("pair_histogram")
    sides = data.get("length_histogram")
    if not isinstance(pair, dict):
        raise problem("pair_histogram", "missing: the per-pair histograms (longer side, pair tokens)")
    if not isinstance(sides, dict):
        raise problem("length_histogram", "missing")

    def histogram(where: dict, edges_key: str, counts_keys: tuple[str, ...], field: str) -> Histogram:
        edges, lists = where.get(edges_key), [where.get(k) for k in counts_keys]
        ok = (isinstance(edges, list) and len(edges) >= 2 and all(isinstance(e, int) for e in edges)
              and all(a < b for a, b in itertools.pairwise(edges)) and edges[0] >= 0)
        ok = ok and all(isinstance(c, list) and len(c) == len(edges) - 1
                        and all(isinstance(x, int) and x >= 0 for x in c) for c in lists)
        if not ok:
            raise problem(field, f"needs increasing integer {edges_key} and, per bin, counts {', '.join(counts_keys)}")
        counts = tuple(sum(c[i] for c in lists) for i in range(len(edges) - 1))
        if not sum(counts):
            raise problem(field, "counts no pairs")
        return Histogram(tuple(edges), counts)

    longer = histogram(pair, "longer_bin_edges", ("longer",), "pair_histogram.longer")
    tokens = histogram(pair, "tokens_bin_edges", ("tokens",), "pair_histogram.tokens")
    # the unpaired (KTO) dataset's: one completion per example, planned as a pair with its KL sequence
    kinds = ("completion",) if "completion" in sides else ("chosen", "rejected")
    sequences = histogram(sides, "bin_edges", kinds, "length_histogram")
    longest = data.get("longest")
    if not (isinstance(longest, dict) and all(isinstance(longest.get(k), int) for k in kinds)):
        raise problem("longest", f"needs the longest {' and '.join(kinds)} sequence")
    responses = pair.get("longer_response_tokens")
    if responses is not None and not (isinstance(responses, list) and len(responses) == len(longer.counts)
                                      and all(isinstance(x, int) and x >= 0 for x in responses)):
        raise problem("pair_histogram.longer_response_tokens", "needs one non-negative integer per longer bin")
    return LengthStats(source, longer.total, longer, tokens, sequences, max(longest[k] for k in kinds),
                       tuple(responses) if responses is not None else None)
