"""Pairwise preference data in megatron-core's indexed format, batched by length and padded dynamically.

`--data-path P` names four indexed datasets, one sequence per pair, written by `dpoc preprocess` or by
MindSpeed-LLM's AlpacaStylePairwiseHandler (the same files, without dpoc's stats; its dropped samples leave
empty documents, which megatron's reader skips): `P_packed_{chosen,rejected}_{input_ids,labels}_document.
{bin,idx}`. Labels are aligned with the input ids (label i is token i) and -100 over the prompt; the loss
predicts token i+1 from position i. A dataset whose stats name other settings than these arguments is
refused (`dpoc.data.identity`). A pair longer than `--seq-length` is cut as MindSpeed-LLM cuts it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from dpoc.data import identity
from dpoc.data.pairwise import FIELDS, open_pairwise
from dpoc.errors import DpocError, Problem

IGNORE_INDEX = -100


class PairwiseDataset:
    """The training view of `dpoc.data.pairwise`'s dataset: item i is (chosen ids, chosen labels, rejected ids,
    rejected labels) as int64 arrays of at most `seq_length` tokens; `pair_lengths` drive length batching.
    `warnings` says what rank 0 should report (no stats to check against; pairs cut to fit)."""

    def __init__(self, data_path: str, seq_length: int, args_file: str = "megatron.args",
                 tokenizer: str | None = None):
        try:
            self.data = open_pairwise(data_path)
        except DpocError as exc:
            raise DpocError([Problem(args_file, "--data-path", f"{data_path!r}: {p.message}")
                             for p in exc.problems]) from None
        expected = {"seq_length": seq_length}
        if tokenizer is not None:
            expected |= {"tokenizer": tokenizer, "tokenizer_sha256": identity.tokenizer_sha256(tokenizer)}
        problems, self.warnings = identity.check(
            data_path, expected, f"run the preprocess.sh of the build {args_file} belongs to")
        if problems:
            raise DpocError(problems)
        self.seq_length = seq_length
        chosen, rejected = self.data.lengths("chosen_input_ids"), self.data.lengths("rejected_input_ids")
        longest = np.maximum(chosen, rejected)
        self.pair_lengths = np.minimum(longest, seq_length)
        cut = int((longest > seq_length).sum())
        if cut:
            self.warnings.append(f"{data_path}: {cut} of {len(longest)} pairs are longer than --seq-length "
                                 f"{seq_length}; they are cut as MindSpeed-LLM cuts them (the prompt's end when "
                                 "the responses are short, else the responses' ends, else both in proportion)")

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> list[np.ndarray]:
        arrays = [np.asarray(self.data.datasets[f][i], dtype=np.int64) for f in FIELDS]
        if max(len(arrays[0]), len(arrays[2])) > self.seq_length:
            arrays = fit_pair(arrays, self.seq_length)
        return arrays


def fit_pair(arrays: list[np.ndarray], limit: int) -> list[np.ndarray]:
    """MindSpeed-LLM's train-time cut of a pair to `limit` tokens: the prompt (up to chosen's first label) and
    the longer response share the budget; every array keeps its prompt's start and its response's start."""
    answered = np.flatnonzero(arrays[1] != IGNORE_INDEX)
    prompt = int(answered[0]) if len(answered) else len(arrays[0])
    response = max(len(arrays[0]), len(arrays[2])) - prompt
    keep_prompt, keep_response = kept_lengths(prompt, response, limit)
    return [np.concatenate([x[:keep_prompt], x[prompt: prompt + keep_response]]) for x in arrays]


def kept_lengths(prompt: int, response: int, limit: int) -> tuple[int, int]:
    """(prompt, response) tokens kept: cut the prompt when the response is under half the limit, else the
    response when the prompt is under half, else both in proportion to their lengths."""
    if 2 * response < limit:
        most = limit
    elif 2 * prompt < limit:
        most = limit - prompt
    else:
        most = int(limit * response / (prompt + response))
    response = min(most, response)
    return min(limit - response, prompt), response


@dataclass
class MicroBatch:
    """2n sequences [chosen_1..n, rejected_1..n], right-padded to one length."""

    tokens: torch.Tensor  # [2n, L] int64
    targets: torch.Tensor  # [2n, L] next-token ids, 0 where masked
    mask: torch.Tensor  # [2n, L] float, 1 on predicted response tokens
    position_ids: torch.Tensor  # [2n, L]
    real_tokens: int  # tokens before padding, for tokens/s
    reference_logps: torch.Tensor | None = field(default=None)  # filled by the reference pass

    def to(self, device: torch.device) -> MicroBatch:
        return MicroBatch(self.tokens.to(device), self.targets.to(device), self.mask.to(device),
                          self.position_ids.to(device), self.real_tokens)

    @property
    def pairs(self) -> int:
        return self.tokens.shape[0] // 2


def collate(pairs: list[list[np.ndarray]], multiple_of: int, at_least: int = 0) -> MicroBatch:
    """Pad to the longest sequence of this micro-batch (or `at_least`) rounded up to `multiple_of`."""
    ids = [p[0] for p in pairs] + [p[2] for p in pairs]
    labels = [p[1] for p in pairs] + [p[3] for p in pairs]
    longest = max(at_least, *(len(x) for x in ids))
    length = -(-longest // multiple_of) * multiple_of
    tokens = torch.zeros(len(ids), length, dtype=torch.int64)
    shifted = torch.full((len(ids), length), IGNORE_INDEX, dtype=torch.int64)
    for row, (x, y) in enumerate(zip(ids, labels, strict=True)):
        tokens[row, : len(x)] = torch.from_numpy(x)
        shifted[row, : len(y) - 1] = torch.from_numpy(y[1:])
    mask = (shifted != IGNORE_INDEX).float()
    positions = torch.arange(length).unsqueeze(0).expand(len(ids), -1).contiguous()
    return MicroBatch(tokens, shifted.clamp(min=0), mask, positions, sum(len(x) for x in ids))


def global_batch_indices(size: int, global_batch: int, step: int, seed: int) -> np.ndarray:
    """Pair indices of optimizer step `step`: epochs are seeded permutations laid end to end."""
    start = step * global_batch
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), size)
        order = np.random.RandomState(seed + epoch).permutation(size)
        out.extend(order[offset: offset + global_batch - len(out)].tolist())
    return np.asarray(out)


def rank_micro_batches(dataset: PairwiseDataset, step: int, global_batch: int, micro_batch: int,
                       dp_rank: int, dp_size: int, seed: int, multiple_of: int, device: torch.device,
                       same_length: bool = False) -> list[MicroBatch]:
    """This data-parallel rank's micro-batches of a step. The step's pairs are sorted by length so each
    micro-batch holds pairs of similar length (little padding); micro-batch k goes to rank k % dp.
    `same_length` pads all of them to the rank's longest pair (the interleaved pipeline needs it)."""
    indices = global_batch_indices(len(dataset), global_batch, step, seed)
    indices = indices[np.argsort(-dataset.pair_lengths[indices], kind="stable")]
    groups = indices.reshape(-1, micro_batch)[dp_rank::dp_size]
    at_least = int(dataset.pair_lengths[groups].max()) if same_length else 0
    return [collate([dataset[int(i)] for i in group], multiple_of, at_least).to(device) for group in groups]


def repeat_for_chunks(batches: list[MicroBatch], chunks: int
                      ) -> Iterator[MicroBatch] | list[Iterator[MicroBatch]]:
    """megatron's schedules take one iterator per virtual pipeline chunk, each over the same batches."""
    if chunks == 1:
        return iter(batches)
    return [iter(batches) for _ in range(chunks)]
