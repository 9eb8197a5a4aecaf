"""Sequence packing and the attention kernels end to end: which pairs share a micro-batch, what a packed
stream holds, and runs whose losses and gradient norms equal the unpacked run with megatron-core's local
attention in one process (fp32, 1e-5), in tp2 / pp2 layouts (SDPA) and packed in 1 process, tp2 with
sequence parallelism, pp2 interleaved (fixed pipeline shapes) and ep2 (MoE).

megatron's MoE aux loss is computed per micro-batch over its tokens, so it depends on which pairs share a
micro-batch: the MoE comparison runs with it off (as test_runtime_train's expert-TP case does).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpoc.contract.packing import pack_pairs
from dpoc.runtime.step.data import IGNORE_INDEX, Batching, PairwiseDataset, global_batch_indices, rank_micro_batches
from tests.runtime.batched import Runs
from tests.runtime.synthetic import write_pairs
from tests.runtime.test_runtime_train import COMPARED, NO_AUX, declare, finished

CPU = torch.device("cpu")
STEPS = 4
PACK = [("--dpoc-packing", True)]


def test_pairs_go_largest_first_to_the_least_filled_of_the_fewest_bins():
    sizes = [50, 10, 40, 30, 30, 20, 60, 10]  # 250 tokens
    bins = pack_pairs(sizes, capacity=100)
    assert bins == [[6, 5, 7], [0, 4], [2, 3, 1]]  # 3 = ceil(250 / 100) bins, fullest first
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
    assert pack_pairs(sizes, capacity=100) == bins  # deterministic
    loads = [sum(sizes[i] for i in b) for b in pack_pairs(sizes, 100, bins_multiple_of=2)]
    assert len(loads) == 4 and max(loads) <= 100 and max(loads) - min(loads) <= max(sizes)
    assert len(pack_pairs([60, 60, 60], capacity=100)) == 3  # 180 tokens, but no two pairs share a bin
    with pytest.raises(ValueError, match="a pair of 101 tokens exceeds the 100-token budget"):
        pack_pairs([101], 100)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> PairwiseDataset:
    return PairwiseDataset(write_pairs(tmp_path_factory.mktemp("packing") / "pairs", pairs=24), seq_length=64)


def packing(**kwargs) -> Batching:
    return Batching(8, 2, seq_length=64, seed=5, multiple_of=kwargs.pop("multiple_of", 1), packing=True, **kwargs)


def test_a_packed_stream_holds_whole_pairs_with_restarting_positions(dataset):
    step = 1
    batches = rank_micro_batches(dataset, step, packing(multiple_of=4), 0, 1, CPU)
    assert [b.pairs for b in batches] == [4, 4] and all(b.step_mean_pairs == 4.0 for b in batches)
    found = []
    for batch in batches:
        assert batch.tokens.shape[0] == 1 and batch.tokens.shape[1] % 4 == 0
        assert batch.tokens.shape[1] - batch.real_tokens < 4 and batch.row_tokens == 2 * 2 * 64
        lengths, n = batch.packed.lengths, batch.pairs
        assert len(lengths) == 2 * n and sum(lengths) == batch.real_tokens
        starts = np.cumsum([0, *lengths[:-1]])
        sequences = []
        for row, (start, length) in enumerate(zip(starts, lengths, strict=True)):
            assert batch.position_ids[0, start: start + length].tolist() == list(range(length))
            targets = batch.targets[0, start: start + length]
            assert int(targets[-1]) == IGNORE_INDEX  # the last token predicts nothing (never the next sequence)
            ids = batch.tokens[0, start: start + length].tolist()
            predicted = targets[batch.mask[row, :length].bool()].tolist()
            sequences.append((tuple(ids), tuple(predicted)))
        found += [(sequences[i], sequences[n + i]) for i in range(n)]  # chosen_i pairs with rejected_i
    expected = []
    for i in global_batch_indices(len(dataset), 8, step, 5):
        chosen_ids, chosen_labels, rejected_ids, rejected_labels = dataset[int(i)]
        expected.append(tuple((tuple(ids.tolist()), tuple(t for t in labels[1:].tolist() if t != IGNORE_INDEX))
                              for ids, labels in ((chosen_ids, chosen_labels), (rejected_ids, rejected_labels))))
    assert sorted(found) == sorted(expected)


def test_ranks_get_equal_counts_and_static_padding_fills_the_budget(dataset):
    ranks = [rank_micro_batches(dataset, 2, packing(), r, 2, CPU) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and sum(b.pairs for r in ranks for b in r) == 8
    steps = len(ranks[0]) * 2
    assert all(b.step_mean_pairs == 8 / steps for r in ranks for b in r)
    full = rank_micro_batches(dataset, 2, packing(full_length=True), 0, 1, CPU)
    assert {b.tokens.shape[1] for b in full} == {2 * 2 * 64}
    uniform = rank_micro_batches(dataset, 2, packing(multiple_of=2, same_length=True), 0, 1, CPU)
    assert len({b.tokens.shape[1] for b in uniform}) == 1


def test_context_parallel_pads_each_packed_sequence_and_keeps_uniform_streams_uniform(dataset):
    batches = rank_micro_batches(dataset, 2, packing(multiple_of=8, sequence_multiple=4, same_length=True), 0, 1,
                                 CPU)
    assert len({b.tokens.shape[1] for b in batches}) == 1  # the interleaved pipeline's one length
    for batch in batches:
        assert all(n % 4 == 0 for n in batch.packed.segments) and batch.tokens.shape[1] % 8 == 0
        assert batch.real_tokens < sum(batch.packed.lengths)  # real tokens, not the per-sequence padding
        assert batch.mask.sum() == (batch.targets != IGNORE_INDEX).sum()  # padding predicts nothing


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packed-runs")
    write_pairs(tmp / "pairs", pairs=64)
    return tmp


# Unpacked SDPA in tp2/pp2 is covered by test_runtime_train's layouts (SDPA is the CPU default) together with
# test_runtime_attention's one-process SDPA == local attention check.
RUNS = {  # name: (processes, flags, MoE, reference run)
    "packed": (1, PACK, False, "dense"),
    "packed-tp2-sp": (2, [*PACK, ("--tensor-model-parallel-size", 2), ("--sequence-parallel", True)], False,
                      "dense"),
    "packed-pp2-vpp2": (2, [*PACK, ("--pipeline-model-parallel-size", 2),
                            ("--num-layers-per-virtual-pipeline-stage", 1)], False, "dense"),
    "packed-ep2-moe": (2, [*PACK, ("--expert-model-parallel-size", 2), *NO_AUX], True, "moe"),
    # context parallelism splits each packed sequence (each padded to a multiple of 2·cp)
    "packed-cp2": (2, [*PACK, ("--context-parallel-size", 2)], False, "dense"),
    "packed-pp2-vpp2-cp2": (4, [*PACK, ("--pipeline-model-parallel-size", 2),
                                ("--num-layers-per-virtual-pipeline-stage", 1), ("--context-parallel-size", 2)],
                            False, "dense"),
}


@pytest.fixture(scope="module")
def runs(workdir) -> Runs:
    """The unpacked one-process runs (dense with megatron-core's local attention, MoE with the aux loss off) and
    the packed ones, launched together per process count."""
    runs = Runs(workdir / "launches")
    declare(runs, workdir, "dense", steps=STEPS, extra=[("--dpoc-core-attention", "local")])
    declare(runs, workdir, "moe", steps=STEPS, moe=True, extra=NO_AUX)
    for name, (processes, flags, moe, _) in RUNS.items():
        declare(runs, workdir, name, processes, steps=STEPS, layout=flags, moe=moe)
    return runs


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.slow
def test_run_equals_the_unpacked_local_attention_run(workdir, runs, name):
    got, expected = finished(runs, workdir, name), finished(runs, workdir, RUNS[name][3])
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for mine, theirs in zip(got, expected, strict=True):
        for key in COMPARED:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (name, mine["step"], key)
    assert all(0 < r["fill"] <= 1 for r in got)
