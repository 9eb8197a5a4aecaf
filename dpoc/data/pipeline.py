"""The preprocessing run: read chunks → encode (in `workers` processes) → write in input order → swap in.

Memory stays bounded: the reader streams, at most `2 * workers` chunks are in flight, and the writer
appends to disk. Results are consumed in input order, so any worker count gives byte-identical output.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator

import numpy as np

from dpoc.contract.errors import DpocError, Problem
from dpoc.data.config import PreprocessConfig
from dpoc.data.detect import settle
from dpoc.data.encode import EncodedPair, Outcome, PairEncoder
from dpoc.data.progress import Progress
from dpoc.data.readers import Chunk, open_source, read_chunks
from dpoc.data.stats import Stats, UnpairedStats

ROWS_PER_CHUNK = 256
UNPAIR_BATCH = 1000  # rows per batch of TRL's unpair_preference_dataset (datasets' map default)


def preprocess(config: PreprocessConfig) -> Stats:
    """Run the whole job; raises DpocError (and leaves the output prefix untouched) on bad input."""
    from dpoc.data.pairwise import PairwiseWriter

    source = open_source(config.input, config.format, config.source)
    settled = settle(config, source)
    if settled.layout == "unpaired" and not config.unpaired:
        raise DpocError([Problem(config.source, "layout", "unpaired rows (a completion and a label) make only the "
                                 "unpaired dataset KTO trains on (valid: unpaired: true, or paired data)")])
    _make_output_dir(config)
    stats = (UnpairedStats if config.unpaired else Stats)(config, settled)
    rows_per_chunk = UNPAIR_BATCH if config.unpaired else ROWS_PER_CHUNK
    with EncoderPool(settled) as encoder, PairwiseWriter(config.output_prefix, config.unpaired) as writer:
        progress = Progress(source.total, source.unit)  # started once the tokenizer and workers are up
        position = 0
        for position, outcomes in encoder.encode_in_order(read_chunks(source, rows_per_chunk)):
            for outcome in outcomes:
                _account(outcome, stats, config)
            for arrays in _chunk_arrays(outcomes, stats):
                writer.add(arrays)
            progress.update(position, stats.kept, stats.tokens_total)
        progress.update(position, stats.kept, stats.tokens_total, final=True)
        if stats.kept == 0:
            what = "examples" if config.unpaired else "pairs"
            raise DpocError([Problem(config.input, "(file)", f"no {what} left to write ({stats.summary()})")])
        writer.commit(stats.to_json())
    return stats


def _make_output_dir(config: PreprocessConfig) -> None:
    """Unlike MindSpeed-RL, create the output directory instead of requiring it."""
    directory = os.path.dirname(os.path.abspath(config.output_prefix))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise DpocError([Problem(config.source, "output_prefix", f"cannot create the directory {directory} "
                                 f"({exc.strerror})")]) from None


def _account(outcome: Outcome, stats: Stats, config: PreprocessConfig) -> None:
    if outcome.problem is not None and not config.skip_bad_lines:
        raise DpocError([Problem(config.input, outcome.where,
                                 f"{outcome.problem} (--skip-bad-lines skips and counts such rows)")])
    stats.add(outcome)


def _chunk_arrays(outcomes: list[Outcome], stats: Stats) -> Iterator[dict]:
    """What one chunk writes, in order: its pairs; unpaired, its examples, where the chunk's pairs are split as
    TRL's unpair_preference_dataset splits each batch: every chosen (desirable) first, then every rejected."""
    if not isinstance(stats, UnpairedStats):
        yield from (_arrays(o.pair) for o in outcomes if o.pair is not None)
        return
    split = [o.pair.examples() for o in outcomes if o.pair is not None]
    examples = [o.example for o in outcomes if o.example is not None] + [c for c, _ in split] + [r for _, r in split]
    for example in examples:
        stats.add_example(example)
        yield {"completion_input_ids": example.ids, "completion_labels": example.labels(),
               "desirable": np.asarray([int(example.desirable)], dtype=np.int32)}


def _arrays(pair: EncodedPair) -> dict:
    return {"chosen_input_ids": pair.chosen, "chosen_labels": pair.labels(pair.chosen),
            "rejected_input_ids": pair.rejected, "rejected_labels": pair.labels(pair.rejected)}


class EncoderPool:
    """Encodes chunks here (workers=1) or in `workers` processes, yielding results in input order."""

    def __init__(self, config: PreprocessConfig):
        self.config = config
        self.encoder = PairEncoder(config)  # also checks tokenizer and template before any worker starts
        self.pool = None

    def __enter__(self) -> EncoderPool:
        if self.config.workers > 1:
            import multiprocessing

            global _worker_encoder
            # fork (where there is one) hands the loaded tokenizer to the workers for free; it happens
            # before the writer imports megatron/torch state and before the parent tokenizes anything
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            _worker_encoder = self.encoder
            context = multiprocessing.get_context(method)
            self.pool = context.Pool(self.config.workers, initializer=_init_worker, initargs=(self.config,))
            _worker_encoder = None
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def encode_in_order(self, chunks: Iterator[Chunk]) -> Iterator[tuple[int, list[Outcome]]]:
        """(input position, outcomes) per chunk; at most 2 * workers chunks are in flight."""
        if self.pool is None:
            for chunk in chunks:
                yield chunk.position, self.encoder.encode(chunk.rows)
            return
        in_flight: deque = deque()
        for chunk in chunks:
            in_flight.append((chunk.position, self.pool.apply_async(_encode_in_worker, (chunk.rows,))))
            if len(in_flight) >= 2 * self.config.workers:
                yield _collect(*in_flight.popleft())
        while in_flight:
            yield _collect(*in_flight.popleft())


def _collect(position: int, result) -> tuple[int, list[Outcome]]:
    outcomes = result.get()
    if isinstance(outcomes, tuple):
        raise DpocError(outcomes[1])
    return position, outcomes


_worker_encoder: PairEncoder | None = None


def _init_worker(config: PreprocessConfig) -> None:
    global _worker_encoder
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if _worker_encoder is None:  # spawned, not forked
        _worker_encoder = PairEncoder(config)


def _encode_in_worker(rows) -> list[Outcome] | tuple[str, tuple[Problem, ...]]:
    # DpocError does not survive pickling, so its problems travel back as data
    try:
        assert _worker_encoder is not None
        return _worker_encoder.encode(rows)
    except DpocError as exc:
        return ("error", exc.problems)
