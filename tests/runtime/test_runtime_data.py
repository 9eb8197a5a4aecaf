"""Pairwise indexed data: length-sorted micro-batches, dynamic padding, seeded order, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpoc.contract.errors import DpocError
from dpoc.runtime.step.data import IGNORE_INDEX, Batching, PairwiseDataset, global_batch_indices, rank_micro_batches
from tests.runtime.synthetic import write_pairs

CPU = torch.device("cpu")


def batching(global_batch: int, micro_batch: int, multiple_of: int = 1, **kwargs) -> Batching:
    return Batching(global_batch, micro_batch, seq_length=64, seed=5, multiple_of=multiple_of, **kwargs)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> PairwiseDataset:
    return PairwiseDataset(write_pairs(tmp_path_factory.mktemp("data") / "pairs", pairs=24), seq_length=64)


def test_micro_batches_hold_chosen_then_rejected_with_shifted_response_labels(dataset):
    batch = rank_micro_batches(dataset, 0, batching(4, 2), 0, 1, CPU)[0]
    first = global_batch_indices(len(dataset), 4, 0, 5)
    first = first[np.argsort(-dataset.pair_lengths[first], kind="stable")][:2]
    for row, (pair, side) in enumerate([(first[0], 0), (first[1], 0), (first[0], 2), (first[1], 2)]):
        ids, labels = dataset[int(pair)][side], dataset[int(pair)][side + 1]
        assert batch.tokens[row, : len(ids)].tolist() == ids.tolist()
        predicted = [t for t in labels[1:].tolist() if t != IGNORE_INDEX]
        assert batch.targets[row][batch.mask[row].bool()].tolist() == predicted
    assert batch.real_tokens == sum(len(dataset[int(p)][s]) for p in first for s in (0, 2))


def test_padding_is_the_micro_batch_longest_rounded_to_tp(dataset):
    batches = rank_micro_batches(dataset, 1, batching(8, 2, 4), 0, 1, CPU)
    for batch in batches:
        longest = int(((batch.tokens != 0).cumsum(-1).argmax(-1) + 1).max())
        assert batch.tokens.shape[1] % 4 == 0 and longest <= batch.tokens.shape[1] < longest + 4
    lengths = [b.tokens.shape[1] for b in batches]
    assert lengths == sorted(lengths, reverse=True)  # pairs are batched by length
    uniform = rank_micro_batches(dataset, 1, batching(8, 2, 4, same_length=True), 0, 1, CPU)
    assert {b.tokens.shape[1] for b in uniform} == {lengths[0]}


def test_data_parallel_ranks_split_the_step_without_overlap(dataset):
    whole = rank_micro_batches(dataset, 2, batching(8, 2), 0, 1, CPU)
    halves = [rank_micro_batches(dataset, 2, batching(8, 2), r, 2, CPU) for r in (0, 1)]
    assert [b.tokens.tolist() for b in whole] == [b.tokens.tolist() for pair in zip(*halves, strict=True)
                                                   for b in pair]


def test_order_is_a_seeded_permutation_per_epoch():
    steps = [global_batch_indices(10, 4, s, seed=3) for s in range(5)]  # 20 pairs = 2 epochs
    flat = np.concatenate(steps)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    again = np.concatenate([global_batch_indices(10, 4, s, seed=3) for s in range(5)])
    assert np.array_equal(flat, again)
    other_seed = np.concatenate([global_batch_indices(10, 4, s, seed=4) for s in range(5)])
    assert not np.array_equal(flat, other_seed)


def test_missing_parts_are_named(tmp_path):
    with pytest.raises(DpocError) as err:
        PairwiseDataset(str(tmp_path / "nothing"), 64, "build/x/megatron.args")
    message = str(err.value)
    assert message.startswith(
        f"build/x/megatron.args: --data-path: '{tmp_path}/nothing': incomplete pairwise dataset: missing "
        f"{tmp_path}/nothing_packed_chosen_input_ids_document.bin, ")
    assert message.endswith("(run dpoc preprocess to write it)")
