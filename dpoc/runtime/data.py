"""Pairwise preference data in megatron-core's indexed format, batched by length and padded dynamically.

`--data-path P` names four indexed datasets written by `dpoc preprocess`, one document per pair:
`P_packed_{chosen,rejected}_{input_ids,labels}_document.{bin,idx}`. Labels are aligned with the input ids
(label i is token i) and -100 over the prompt; the loss predicts token i+1 from position i.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from dpoc.data.pairwise import FIELDS, open_pairwise
from dpoc.errors import DpocError, Problem

IGNORE_INDEX = -100


class PairwiseDataset:
    """The training view of `dpoc.data.pairwise`'s dataset: item i is (chosen ids, chosen labels, rejected ids,
    rejected labels) as int64 arrays truncated to `seq_length` tokens; `pair_lengths` drive length batching."""

    def __init__(self, data_path: str, seq_length: int, args_file: str = "megatron.args"):
        try:
            self.data = open_pairwise(data_path)
        except DpocError as exc:
            raise DpocError([Problem(args_file, "--data-path", f"{data_path!r}: {p.message}")
                             for p in exc.problems]) from None
        self.seq_length = seq_length
        chosen, rejected = self.data.lengths("chosen_input_ids"), self.data.lengths("rejected_input_ids")
        self.pair_lengths = np.minimum(np.maximum(chosen, rejected), seq_length)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> list[np.ndarray]:
        return [np.asarray(self.data.datasets[f][i][: self.seq_length], dtype=np.int64) for f in FIELDS]


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
