"""Pairwise preference data in megatron-core's indexed format, batched by length and padded dynamically, or
packed (several pairs per token stream, `packing.py`).

`--data-path P` names four indexed datasets, one sequence per pair, written by `dpoc preprocess` or by
MindSpeed-LLM's AlpacaStylePairwiseHandler (the same files, without dpoc's stats; its dropped samples leave
empty documents, which megatron's reader skips): `P_packed_{chosen,rejected}_{input_ids,labels}_document.
{bin,idx}`. Labels are aligned with the input ids (label i is token i) and -100 over the prompt; the loss
predicts token i+1 from position i. A dataset whose stats name other settings than these arguments is
refused (`dpoc.data.identity`). A pair longer than `--seq-length` is cut as MindSpeed-LLM cuts it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from dpoc.contract import losses
from dpoc.contract.errors import DpocError, Problem
from dpoc.contract.packing import pack_pairs
from dpoc.data import identity
from dpoc.data.pairwise import FIELDS, open_pairwise
from dpoc.runtime.model.attention import PackedSequences
from dpoc.runtime.model.context_parallel import padding_multiple

IGNORE_INDEX = -100


class PairwiseDataset:
    """The training view of `dpoc.data.pairwise`'s dataset: item i is (chosen ids, chosen labels, rejected ids,
    rejected labels) as int64 arrays of at most `seq_length` tokens; `pair_lengths` (the longer side) drive
    length batching, `pair_tokens` (both sides; an upper bound for a pair that is cut) packing. `warnings`
    says what rank 0 should report (no stats to check against; pairs cut to fit)."""

    block = 0  # pairs are batched freely (KTO's examples come in fixed blocks: `unpaired.py`)
    desirable = None  # KTO's labels

    def __init__(self, data_path: str, seq_length: int, args_file: str = "megatron.args",
                 tokenizer: str | None = None):
        self.data, self.warnings = open_checked(data_path, seq_length, args_file, tokenizer, unpaired=False)
        self.seq_length = seq_length
        chosen, rejected = self.data.lengths("chosen_input_ids"), self.data.lengths("rejected_input_ids")
        longest = np.maximum(chosen, rejected)
        self.pair_lengths = np.minimum(longest, seq_length)
        # a cut pair keeps at most seq_length tokens a side (fit_pair)
        self.pair_tokens = np.minimum(chosen, seq_length) + np.minimum(rejected, seq_length)
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


def open_checked(data_path: str, seq_length: int, args_file: str, tokenizer: str | None, unpaired: bool
                 ) -> tuple[Any, list[str]]:
    """The dataset at `data_path` (pairwise or unpaired) if its stats name these settings, and what rank 0
    should warn of; problems name `--data-path` in `args_file`."""
    try:
        data = open_pairwise(data_path, unpaired)
    except DpocError as exc:
        raise DpocError([Problem(args_file, "--data-path", f"{data_path!r}: {p.message}")
                         for p in exc.problems]) from None
    expected = {"seq_length": seq_length, "unpaired": unpaired}
    if tokenizer is not None:
        expected |= {"tokenizer": tokenizer, "tokenizer_sha256": identity.tokenizer_sha256(tokenizer)}
    problems, warnings = identity.check(data_path, expected, f"run the preprocess.sh of the build {args_file} "
                                        "belongs to")
    if problems:
        raise DpocError(problems)
    return data, warnings


def training_dataset(args: argparse.Namespace, args_file: str):
    """The dataset `--data-path` names for these args: KTO's unpaired one (blocks of `--micro-batch-size`), else
    the pairwise one."""
    if losses.unpaired(args.dpo_loss_type):
        from dpoc.runtime.step.unpaired import UnpairedDataset  # it reads open_checked from here

        return UnpairedDataset(args.data_path, args.seq_length, args.micro_batch_size, args_file,
                               args.tokenizer_name_or_path)
    return PairwiseDataset(args.data_path, args.seq_length, args_file, args.tokenizer_name_or_path)


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
    """n pairs. Unpacked: 2n rows [chosen_1..n, rejected_1..n], right-padded to one length. Packed: one
    stream [1, t] holding those 2n sequences end to end (`packed` says where each one lies)."""

    tokens: torch.Tensor  # [2n, L] or [1, t] int64
    targets: torch.Tensor  # next-token ids, IGNORE_INDEX where nothing is predicted (model.py skips those)
    mask: torch.Tensor  # [2n, L'] float, 1 on predicted response tokens, per sequence (L' = L unpacked)
    position_ids: torch.Tensor  # like tokens; restarting at each sequence when packed
    real_tokens: int  # tokens before padding, for tokens/s and the fill
    row_tokens: int  # tokens of the rows: 2n x L unpacked, the micro-batch's token budget packed
    step_mean_pairs: float = 0.0  # pairs per micro-batch, averaged over the step's micro-batches (all ranks)
    packed: PackedSequences | None = None
    pair_ids: tuple[int, ...] = ()  # each pair's index in the dataset, in row order (-1: a filler)
    reference_logps: torch.Tensor | None = field(default=None)  # [2n] summed, by the reference pass or the file
    desirable: torch.Tensor | None = None  # KTO: [n] bool, each completion's label (its rows: completion, KL)

    def to(self, device: torch.device) -> MicroBatch:
        """The tensors on `device`; a packed micro-batch's cu_seqlens stay on the host (PackedSequences says why)."""
        return replace(self, tokens=self.tokens.to(device), targets=self.targets.to(device),
                       mask=self.mask.to(device), position_ids=self.position_ids.to(device),
                       desirable=self.desirable.to(device) if self.desirable is not None else None)

    @property
    def pairs(self) -> int:
        return self.mask.shape[0] // 2

    def per_sequence(self, token_values: torch.Tensor) -> torch.Tensor:
        """A model output per token ([2n, L], or [1, t] packed) as rows [2n, L'] aligned with `mask`."""
        return token_values if self.packed is None else self.packed.rows(token_values[0])


@dataclass(frozen=True)
class Batching:
    """How a step's pairs become micro-batches (from megatron.args)."""

    global_batch: int  # pairs per step
    micro_batch: int  # pairs per micro-batch; packed: the token budget is 2 x micro_batch x seq_length
    seq_length: int
    seed: int
    multiple_of: int  # sequence and context parallelism split every micro-batch's length (padding_multiple)
    full_length: bool = False  # static padding: every row at seq_length (packed: every stream at its budget)
    same_length: bool = False  # one length for all micro-batches of a step (the interleaved pipeline)
    packing: bool = False
    sequence_multiple: int = 1  # packed: each sequence padded to this (2·cp: context parallelism splits each)

    @classmethod
    def from_args(cls, args: argparse.Namespace, same_length: bool) -> Batching:
        cp = args.context_parallel_size
        return cls(args.global_batch_size, args.micro_batch_size, args.seq_length, args.seed,
                   padding_multiple(args.tensor_model_parallel_size, cp),
                   full_length=not args.no_pad_to_seq_lengths, same_length=same_length, packing=args.dpoc_packing,
                   sequence_multiple=2 * cp if cp > 1 else 1)

    @property
    def budget(self) -> int:
        """Tokens of one micro-batch's rows: 2 x micro_batch sequences of seq_length."""
        return 2 * self.micro_batch * self.seq_length


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
    return MicroBatch(tokens, shifted, mask, positions, sum(len(x) for x in ids), len(ids) * length)


def collate_packed(pairs: list[list[np.ndarray]], budget: int, multiple_of: int, at_least: int = 0,
                   sequence_multiple: int = 1) -> MicroBatch:
    """One stream [chosen_1..n, rejected_1..n] padded at its end to a multiple of `multiple_of` (and to
    `at_least`), each sequence padded at its end to a multiple of `sequence_multiple` (context parallelism
    splits each one; causal attention never reads the padding); labels shift within each sequence, so no
    token predicts the next sequence's first."""
    ids = [p[0] for p in pairs] + [p[2] for p in pairs]
    labels = [p[1] for p in pairs] + [p[3] for p in pairs]
    real = sum(len(x) for x in ids)
    lengths = tuple(-(-len(x) // sequence_multiple) * sequence_multiple for x in ids)
    length = -(-max(sum(lengths), at_least) // multiple_of) * multiple_of
    tokens = torch.zeros(1, length, dtype=torch.int64)
    shifted = torch.full((1, length), IGNORE_INDEX, dtype=torch.int64)
    positions = torch.zeros(1, length, dtype=torch.int64)
    start = 0
    for x, y, n in zip(ids, labels, lengths, strict=True):
        tokens[0, start: start + len(x)] = torch.from_numpy(x)
        shifted[0, start: start + len(y) - 1] = torch.from_numpy(y[1:])
        positions[0, start: start + n] = torch.arange(n)
        start += n
    packed = PackedSequences.of(lengths, length - sum(lengths))
    mask = packed.rows((shifted[0] != IGNORE_INDEX).float())
    return MicroBatch(tokens, shifted, mask, positions, real, budget, packed=packed)


def global_batch_indices(size: int, global_batch: int, step: int, seed: int) -> np.ndarray:
    """Pair indices of optimizer step `step`: epochs are seeded permutations laid end to end."""
    start = step * global_batch
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), size)
        order = np.random.RandomState(seed + epoch).permutation(size)
        out.extend(order[offset: offset + global_batch - len(out)].tolist())
    return np.asarray(out)


def step_groups(dataset: PairwiseDataset, step: int, batching: Batching, dp_size: int) -> list[np.ndarray]:
    """The pair indices of each micro-batch of a step, in the step's order (micro-batch k goes to rank k % dp).

    Unpacked: the step's pairs sorted by length, `micro_batch` at a time (pairs of similar length: little
    padding). Packed: `packing.pack_pairs` over the step's pairs into token budgets. KTO: seeded blocks of
    `micro_batch` consecutive examples, one per micro-batch (each is its own KL batch; `unpaired.py`)."""
    if dataset.block:
        blocks = global_batch_indices(len(dataset) // dataset.block, batching.global_batch // dataset.block, step,
                                      batching.seed)
        return [np.arange(b * dataset.block, (b + 1) * dataset.block) for b in blocks]
    indices = global_batch_indices(len(dataset), batching.global_batch, step, batching.seed)
    if batching.packing:
        sizes = dataset.pair_tokens[indices].tolist()
        return [indices[b] for b in pack_pairs(sizes, batching.budget, dp_size)]
    indices = indices[np.argsort(-dataset.pair_lengths[indices], kind="stable")]
    return list(indices.reshape(-1, batching.micro_batch))


def rank_micro_batches(dataset: PairwiseDataset, step: int, batching: Batching, dp_rank: int, dp_size: int,
                       device: torch.device) -> list[MicroBatch]:
    """This data-parallel rank's micro-batches of a step (`step_groups`), collated on `device`."""
    groups = step_groups(dataset, step, batching, dp_size)
    mean_pairs = batching.global_batch / len(groups)
    mine = groups[dp_rank::dp_size]
    # a micro-batch's length: its own (a packed stream's tokens, else its longest sequence), or the rank's
    # longest (`same_length`), or the full one (`full_length`: the budget packed, else seq_length)
    own = dataset.pair_tokens if batching.packing else dataset.pair_lengths
    at_least = 0
    if batching.full_length:
        at_least = batching.budget if batching.packing else batching.seq_length
    elif batching.same_length:  # packed: at most sequence_multiple - 1 padding tokens per sequence on top
        slack = 2 * (batching.sequence_multiple - 1)
        at_least = max(int(own[g].sum() + slack * len(g) if batching.packing else own[g].max()) for g in mine)
    if batching.packing:
        batches = [collate_packed([dataset[int(i)] for i in g], batching.budget, batching.multiple_of, at_least,
                                  batching.sequence_multiple) for g in mine]
    else:
        batches = [collate([dataset[int(i)] for i in g], batching.multiple_of, at_least) for g in mine]
    return [replace(b, step_mean_pairs=mean_pairs, pair_ids=tuple(int(i) for i in g),
                    desirable=None if dataset.desirable is None else torch.from_numpy(dataset.desirable[g])).to(device)
            for b, g in zip(batches, mine, strict=True)]


def repeat_for_chunks(batches: list[MicroBatch], chunks: int
                      ) -> Iterator[MicroBatch] | list[Iterator[MicroBatch]]:
    """megatron's schedules take one iterator per virtual pipeline chunk, each over the same batches."""
    if chunks == 1:
        return iter(batches)
    return [iter(batches) for _ in range(chunks)]
