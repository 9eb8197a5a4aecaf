"""KTO's unpaired dataset as the runtime batches it: each example with its KL sequence, built as TRL 1.16's
KTOTrainer builds it.

TRL samples KTO batches sequentially (`train_sampling_strategy='sequential'`) and gives each example, as its
KL sequence, its own prompt with the completion of its predecessor within its run of
`per_device_train_batch_size` examples (`kl_partners`), so a batch's KL sequences use the batch's own
completions. Here a micro-batch is always one such run (a block of `--micro-batch-size` consecutive examples;
the steps draw seeded permutations of the blocks, and a last partial block is left out), so the same holds,
and each example's KL sequence is fixed: the precompute pass stores the reference's log-probs of both.

Item i is laid out as a pair, (completion ids, labels, KL ids, KL labels), so the pairwise micro-batches,
packing and both reference passes carry it unchanged; `desirable` holds the labels. Sequences longer than
`--seq-length` keep their start, as TRL's collator truncates.
"""

from __future__ import annotations

import numpy as np

from dpoc.contract.errors import DpocError, Problem
from dpoc.runtime.losses.kto import kl_partners
from dpoc.runtime.step.data import open_checked

IGNORE_INDEX = -100


class UnpairedDataset:
    def __init__(self, data_path: str, seq_length: int, block: int, args_file: str = "megatron.args",
                 tokenizer: str | None = None):
        self.data, self.warnings = open_checked(data_path, seq_length, args_file, tokenizer, unpaired=True)
        total = len(self.data)
        self.block, self.seq_length = block, seq_length
        usable = total // block * block
        if usable == 0:
            raise DpocError([Problem(args_file, "--data-path", f"{data_path!r}: {total} examples, fewer than one "
                                     f"micro-batch of {block} (valid: a larger dataset or --micro-batch-size)")])
        if usable < total:
            self.warnings.append(f"{data_path}: the last {total - usable} of {total} examples fill no micro-batch "
                                 f"of {block} (each is one KL batch) and are never trained on")
        self.size = usable
        self.desirable = self._flat("desirable", total)[:usable].astype(bool)
        lengths = self.data.lengths("completion_input_ids").astype(np.int64)
        self.prompt = _prompt_lengths(self._flat("completion_labels", int(lengths.sum())), lengths)[:usable]
        lengths = lengths[:usable]
        self.partners = np.asarray(kl_partners(usable, block), dtype=np.int64)
        own = np.minimum(lengths, seq_length)
        kl = np.minimum(self.prompt + (lengths - self.prompt)[self.partners], seq_length)
        self.pair_lengths = np.maximum(own, kl)
        self.pair_tokens = own + kl

    def _flat(self, field: str, tokens: int) -> np.ndarray:
        """Every token of one dataset, its documents end to end (the builder writes them so)."""
        return np.asarray(self.data.datasets[field].get(0, 0, tokens))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> list[np.ndarray]:
        j = int(self.partners[i])
        ids, labels = self._example(i)
        other_ids, other_labels = self._example(j)
        p, q = int(self.prompt[i]), int(self.prompt[j])
        kl_ids = np.concatenate([ids[:p], other_ids[q:]])
        kl_labels = np.concatenate([labels[:p], other_labels[q:]])
        return [x[: self.seq_length] for x in (ids, labels, kl_ids, kl_labels)]

    def _example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return (np.asarray(self.data.datasets["completion_input_ids"][i], dtype=np.int64),
                np.asarray(self.data.datasets["completion_labels"][i], dtype=np.int64))


def _prompt_lengths(labels: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each example's prompt length: its labels' -100s (a prefix), counted without a loop over examples."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.add.reduceat((labels == IGNORE_INDEX).astype(np.int64), starts) if len(labels) else lengths * 0
