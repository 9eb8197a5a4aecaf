"""The precompute pass of `--dpoc-reference precomputed`: `torchrun ... -m dpoc.runtime.precompute @megatron.args`
(the build's reference.sh), and training's lookup of its values.

Forward passes only, through the same pipeline schedule as the live reference pass, of the same reference (a
LoRA run's with `--lora-load`: the base with the initial adapter, `session.build_reference_alone`), at the args'
layout: the whole dataset sorted by length (little padding), `--dpoc-reference-micro-batch-size` pairs per micro-batch
(no activations are kept for a backward, so it can be larger than training's), micro-batch k on
data-parallel rank k % dp, `ROUND_MICRO_BATCHES` micro-batches per schedule call. Each replica's last stage
hands its pairs' summed log-probs to rank 0, which writes `reference_file`'s file atomically; nothing else is
written. A file that is already current is left alone (exit 0 at once), so the node scripts can run the pass
before every start.

Training reads the file on rank 0 only and broadcasts it: on node-local filesystems only node 0 (where the
pass's rank 0 wrote it) needs it, and no rank trains before every rank holds the values.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch.distributed as dist
from megatron.core import parallel_state

from dpoc.contract.errors import DpocError, Problem
from dpoc.contract.runs import ROUND_MICRO_BATCHES
from dpoc.runtime.model.context_parallel import padding_multiple
from dpoc.runtime.model.device import Device
from dpoc.runtime.model.gpt import transformer_config, uniform_micro_batch_length
from dpoc.runtime.reference import reference_file
from dpoc.runtime.step.agree import from_rank0
from dpoc.runtime.step.data import MicroBatch, PairwiseDataset, collate, training_dataset
from dpoc.runtime.step.passes import holds_outputs, reference_pass
from dpoc.runtime.step.session import build_reference_alone, entry, initialize_parallel


def main(argv: Sequence[str] | None = None) -> int:
    return entry(argv, precompute, check=_needs_precomputed)


def _needs_precomputed(args: argparse.Namespace, args_file: str) -> None:
    """A live build never reads the file: computing it would be work for nothing, so say so."""
    if args.dpoc_reference != "precomputed":
        raise DpocError([Problem(args_file, "--dpoc-reference", f"{args.dpoc_reference}: training runs the reference "
                                 "itself, so the precompute pass has nothing to do (valid: precomputed)")])


def pass_groups(pair_lengths: np.ndarray, micro_batch: int, dp_rank: int, dp_size: int) -> list[np.ndarray]:
    """This rank's micro-batches of pair indices: every pair once, longest first, micro-batch k to rank
    k % dp_size (a rank may get one fewer)."""
    order = np.argsort(-pair_lengths, kind="stable")
    groups = [order[i: i + micro_batch] for i in range(0, len(order), micro_batch)]
    return groups[dp_rank::dp_size]


def precompute(args: argparse.Namespace, device: Device, args_file: str, weights) -> int:
    initialize_parallel(args)
    dataset = training_dataset(args, args_file)  # checks it
    ident = from_rank0(lambda: reference_file.identity(args))
    found = from_rank0(lambda: reference_file.status(args, ident))
    rank0 = dist.get_rank() == 0
    if found.current:
        if rank0:
            print(f"[dpoc] reference log-probs up to date: {found.path}", file=sys.stderr)
        return 0
    if rank0:
        for tmp in reference_file.remove_partial(args.data_path):
            print(f"[dpoc] removed {tmp}, left by an interrupted precompute pass", file=sys.stderr)
        print(f"[dpoc] precomputing reference log-probs into {found.path} ({found.why})", file=sys.stderr)
    started = time.perf_counter()
    chunks = build_reference_alone(args, transformer_config(args, device), weights)
    micro_batch = args.dpoc_reference_micro_batch_size or args.micro_batch_size
    groups = pass_groups(dataset.pair_lengths, micro_batch, parallel_state.get_data_parallel_rank(),
                         parallel_state.get_data_parallel_world_size())
    multiple = padding_multiple(args.tensor_model_parallel_size, args.context_parallel_size)
    mine: list[tuple[tuple[int, ...], np.ndarray]] = []
    for first in range(0, len(groups), ROUND_MICRO_BATCHES):
        batches = _round(dataset, groups[first: first + ROUND_MICRO_BATCHES], micro_batch, multiple,
                         uniform_micro_batch_length(args), device)
        reference_pass(chunks, batches)
        if holds_outputs():
            mine += [(b.pair_ids, b.reference_logps.float().cpu().numpy()) for b in batches]
    found_all = [None] * dist.get_world_size() if rank0 else None
    dist.gather_object(mine, found_all, dst=0)
    if rank0:
        logps = _table(found_all, len(dataset))
        reference_file.write(found.path, logps, ident, reference_file.pause_for_tests)
        print(f"[dpoc] wrote {found.path}: {len(dataset)} pairs in {time.perf_counter() - started:.1f} s "
              f"({micro_batch} pairs per micro-batch)", file=sys.stderr)
    dist.barrier()  # the file is whole before any rank returns (and the node script starts training)
    return 0


def _round(dataset: PairwiseDataset, groups: list[np.ndarray], micro_batch: int, multiple: int, same_length: bool,
           device: Device) -> list[MicroBatch]:
    """One schedule call's micro-batches, each of `micro_batch` pairs (a short last one repeats its own pairs:
    the pipeline's buffers have one shape); one length for all when the interleaved pipeline needs it."""
    at_least = max(int(dataset.pair_lengths[g].max()) for g in groups) if same_length else 0
    out = []
    for g in groups:
        ids = np.resize(g, micro_batch)
        batch = collate([dataset[int(i)] for i in ids], multiple, at_least)
        out.append(replace(batch, pair_ids=tuple(int(i) for i in ids)).to(device.current()))
    return out


def _table(found: list, pairs: int) -> np.ndarray:
    """[pairs, 2] (chosen, rejected) from every output rank's (pair ids, [2n] sums)."""
    logps = np.full((pairs, 2), np.nan, dtype=np.float32)
    for rank_results in found:
        for ids, sums in rank_results:
            n = len(ids)
            logps[list(ids), 0], logps[list(ids), 1] = sums[:n], sums[n:]
    missing = int(np.isnan(logps).any(axis=1).sum())
    if missing:  # an internal error, not bad input: no file is written
        raise RuntimeError(f"the precompute pass left {missing} of {pairs} pairs without log-probs")
    return logps


if __name__ == "__main__":
    sys.exit(main())
