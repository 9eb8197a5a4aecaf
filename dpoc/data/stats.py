"""`{prefix}_stats.json`: the settings it was made with (`dpoc.data.identity`, checked before training), what
came in, what was kept or dropped and why, token counts, length histograms: each side's, and per pair its longer
side (what a padded micro-batch pads to), with the response tokens of the pairs in each of its bins (the prompt /
response split: the runtime's LM head runs on response positions only), and both sides' tokens (what a packed
pair takes), which the planner reads (`training.length_stats`, `dpoc.planner.lengths`).

The unpaired dataset (KTO, `UnpairedStats`) counts examples instead of pairs, desirable and undesirable ones,
and its per-pair histograms describe what a KTO micro-batch holds per example: the example and its KL sequence
(its prompt with another example's completion), both counted at the example's own length.

Deterministic (no timings), so the same input gives the same file whatever the worker count.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dpoc.data.config import PreprocessConfig
from dpoc.data.encode import EncodedExample, Outcome
from dpoc.data.identity import settings

HISTOGRAM_BINS = 16
PAIR_BINS = 64  # finer: the planner's padded lengths assume lengths uniform within a bin
_EXAMPLES_KEPT = 10


class Stats:
    def __init__(self, config: PreprocessConfig, read_as: PreprocessConfig):
        """`config` as given; `read_as` with what `layout: auto` detected."""
        self.config, self.read_as = config, read_as
        self.pairs_in = self.pairs_kept = self.truncated = 0
        self.dropped = {"too_long": 0, "empty": 0, "bad_rows": 0}
        self.bad_row_examples: list[str] = []
        self.tokens = {"prompt": 0, "chosen_response": 0, "rejected_response": 0}
        self.longest = {"chosen": 0, "rejected": 0}
        self.bin_width, bins = _bins(config.seq_length, HISTOGRAM_BINS)
        self.histogram = {"chosen": [0] * bins, "rejected": [0] * bins}
        self.pair_width, bins = _bins(config.seq_length, PAIR_BINS)
        self.pair_histogram = {"longer": [0] * bins, "longer_response_tokens": [0] * bins, "tokens": [0] * bins}

    def add(self, outcome: Outcome) -> None:
        self.pairs_in += 1
        if outcome.problem is not None:
            self.dropped["bad_rows"] += 1
            if len(self.bad_row_examples) < _EXAMPLES_KEPT:
                self.bad_row_examples.append(f"{outcome.where}: {outcome.problem}")
            return
        if outcome.dropped is not None:
            self.dropped[outcome.dropped] += 1
            return
        pair = outcome.pair
        self.pairs_kept += 1
        self.truncated += pair.truncated
        self.tokens["prompt"] += pair.prompt_length
        for side, ids in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            self.tokens[f"{side}_response"] += len(ids) - pair.prompt_length
            self.longest[side] = max(self.longest[side], len(ids))
            self.histogram[side][len(ids) // self.bin_width] += 1
        chosen, rejected = len(pair.chosen), len(pair.rejected)
        longer = max(chosen, rejected) // self.pair_width
        self.pair_histogram["longer"][longer] += 1
        self.pair_histogram["longer_response_tokens"][longer] += chosen + rejected - 2 * pair.prompt_length
        self.pair_histogram["tokens"][(chosen + rejected) // (2 * self.pair_width)] += 1

    @property
    def kept(self) -> int:
        return self.pairs_kept

    @property
    def tokens_total(self) -> int:
        """Tokens written to the input-id datasets (the prompt counts once per sequence)."""
        return 2 * self.tokens["prompt"] + self.tokens["chosen_response"] + self.tokens["rejected_response"]

    def summary(self) -> str:
        d = self.dropped
        detected = f" (layout {self.read_as.layout}, detected)" if self.config.layout == "auto" else ""
        return (f"{self.pairs_in} rows read{detected}, {self.pairs_kept} kept, {d['too_long']} dropped for length "
                f">= seq_length {self.config.seq_length}, {d['empty']} with an empty prompt or response, "
                f"{d['bad_rows']} bad rows skipped, {self.truncated} truncated")

    def to_json(self) -> dict[str, Any]:
        c = self.config
        return {
            "settings": settings(dataclasses.asdict(c)),  # what the node preflight and the runtime check
            "read_as": {"layout": self.read_as.layout, "map_keys": dict(self.read_as.map_keys)},
            "pairs_in": self.pairs_in, "pairs_kept": self.pairs_kept, "dropped": dict(self.dropped),
            "truncated": self.truncated, "bad_row_examples": list(self.bad_row_examples),
            "tokens": {**self.tokens, "total": self.tokens_total},
            "longest": dict(self.longest),
            "length_histogram": {
                "bin_edges": _edges(self.bin_width, c.seq_length),
                **{k: list(v) for k, v in self.histogram.items()}},
            "pair_histogram": {
                "longer_bin_edges": _edges(self.pair_width, c.seq_length),
                "longer": list(self.pair_histogram["longer"]),
                "longer_response_tokens": list(self.pair_histogram["longer_response_tokens"]),
                "tokens_bin_edges": _edges(2 * self.pair_width, 2 * c.seq_length),
                "tokens": list(self.pair_histogram["tokens"])},
        }


def _bins(seq_length: int, most: int) -> tuple[int, int]:
    """(bin width, bins): at most `most` bins of one integer width covering lengths below seq_length."""
    width = -(-seq_length // most)
    return width, -(-seq_length // width)


def _edges(width: int, end: int) -> list[int]:
    return [*range(0, end, width), end]


class UnpairedStats(Stats):
    """The unpaired dataset's stats: rows read (pairs, when pairs are split), examples kept by label."""

    def __init__(self, config: PreprocessConfig, read_as: PreprocessConfig):
        super().__init__(config, read_as)
        self.labels = {"desirable": 0, "undesirable": 0}
        self.tokens = {"prompt": 0, "completion": 0}
        self.longest = {"completion": 0}
        self.histogram = {"completion": [0] * len(self.histogram["chosen"])}

    def add(self, outcome: Outcome) -> None:
        """A row: its drop or problem is counted here, its examples by `add_example`."""
        if outcome.pair is None and outcome.example is None:
            super().add(outcome)
        else:
            self.pairs_in += 1
            self.truncated += (outcome.pair or outcome.example).truncated

    def add_example(self, example: EncodedExample) -> None:
        self.labels["desirable" if example.desirable else "undesirable"] += 1
        self.tokens["prompt"] += example.prompt_length
        self.tokens["completion"] += len(example.ids) - example.prompt_length
        self.longest["completion"] = max(self.longest["completion"], len(example.ids))
        self.histogram["completion"][len(example.ids) // self.bin_width] += 1
        self.pair_histogram["longer"][len(example.ids) // self.pair_width] += 1
        self.pair_histogram["tokens"][len(example.ids) // self.pair_width] += 1

    @property
    def kept(self) -> int:
        return sum(self.labels.values())

    @property
    def tokens_total(self) -> int:
        return self.tokens["prompt"] + self.tokens["completion"]

    def summary(self) -> str:
        d = self.dropped
        detected = f" (layout {self.read_as.layout}, detected)" if self.config.layout == "auto" else ""
        split = ", pairs split in two" if self.read_as.layout != "unpaired" else ""
        return (f"{self.pairs_in} rows read{detected}{split}, {self.kept} examples kept ({self.labels['desirable']} "
                f"desirable, {self.labels['undesirable']} undesirable), {d['too_long']} rows dropped for length >= "
                f"seq_length {self.config.seq_length}, {d['empty']} with an empty prompt or response, "
                f"{d['bad_rows']} bad rows skipped, {self.truncated} truncated")

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        del out["pairs_in"], out["pairs_kept"]
        return {**out, "rows_in": self.pairs_in, "examples_kept": self.kept, **self.labels}
