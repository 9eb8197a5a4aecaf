"""The preprocessed datasets on disk: MindSpeed-RL's four pairwise Megatron indexed datasets, or dpoc's three
unpaired ones (KTO), plus dpoc's stats file.

Pairwise: `{prefix}_packed_{chosen_input_ids,chosen_labels,rejected_input_ids,rejected_labels}_document.{bin,idx}`,
one document (one sequence) per preference pair. Unpaired: `{prefix}_packed_{completion_input_ids,
completion_labels,desirable}_document.{bin,idx}`, one document per example, `desirable` a one-token document
(1: desirable, 0: not). All int32, written with megatron-core's own `IndexedDatasetBuilder` and read back with
its `IndexedDataset`. The training `data_path` is `prefix`. The names (`FIELDS`, `UNPAIRED_FIELDS`,
`dataset_files`, `output_files`) import nothing heavy, so the compiler's preflight can use them.
"""

from __future__ import annotations

import json
import os
import shutil
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpoc.common import deferred_fusions, harmless_warnings
from dpoc.common.atomic import swap_in
from dpoc.contract.errors import DpocError, Problem

if TYPE_CHECKING:
    import numpy as np

FIELDS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
UNPAIRED_FIELDS = ("completion_input_ids", "completion_labels", "desirable")


def fields_of(unpaired: bool) -> tuple[str, ...]:
    return UNPAIRED_FIELDS if unpaired else FIELDS


def dataset_prefix(prefix: str, field: str) -> str:
    return f"{prefix}_packed_{field}_document"


def stats_path(prefix: str) -> str:
    return f"{prefix}_stats.json"


def dataset_files(prefix: str, unpaired: bool = False) -> list[str]:
    """The files training reads (pairwise: MindSpeed-LLM's eight; unpaired: six; no stats file)."""
    return [dataset_prefix(prefix, f) + ext for f in fields_of(unpaired) for ext in (".bin", ".idx")]


def output_files(prefix: str, unpaired: bool = False) -> list[str]:
    """Every file a finished preprocessing run leaves, the stats file last (it marks completion)."""
    return [*dataset_files(prefix, unpaired), stats_path(prefix)]


def _before_megatron() -> None:
    """What any process does before its first megatron-core import (the runtime's package does the same): its
    fused kernels compiled on first call, and its known harmless import warnings hidden."""
    deferred_fusions.install()
    harmless_warnings.ignore()


class PairwiseWriter:
    """Writes into a hidden temporary directory next to the output; `commit` swaps all files in together.

    The output's directory must exist. Until `commit`, nothing at the output prefix changes. `commit`
    moves existing outputs aside first and puts them back if placing the new ones fails, so the prefix
    holds either the old set or the new one.
    """

    def __init__(self, prefix: str, unpaired: bool = False):
        import numpy as np

        _before_megatron()
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix, self.unpaired = prefix, unpaired
        out_dir, self.stem = os.path.split(os.path.abspath(prefix))
        self.tmp = Path(out_dir) / f".{self.stem}.dpoc-tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.tmp_prefix = str(self.tmp / self.stem)
        self.builders = {f: IndexedDatasetBuilder(dataset_prefix(self.tmp_prefix, f) + ".bin", dtype=np.int32)
                         for f in fields_of(unpaired)}
        for builder in self.builders.values():
            # typed arrays instead of the builder's Python lists: ~12 bytes per pair instead of ~70, so
            # memory stays flat on large inputs (the builder only appends/extends them and reads them once)
            builder.sequence_lengths = array("i")
            builder.document_indices = array("q", [0])

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        for field, builder in self.builders.items():
            builder.add_document(arrays[field], [len(arrays[field])])

    def commit(self, stats: dict[str, Any]) -> None:
        for field, builder in self.builders.items():
            builder.finalize(dataset_prefix(self.tmp_prefix, field) + ".idx")
        Path(stats_path(self.tmp_prefix)).write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
        self._swap()

    def abort(self) -> None:
        for builder in self.builders.values():
            builder.data_file.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _swap(self) -> None:
        old = self.tmp / "previous"
        old.mkdir()
        try:
            swap_in(list(zip(output_files(self.tmp_prefix, self.unpaired), output_files(self.prefix, self.unpaired),
                             strict=True)), old)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> PairwiseWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.tmp.exists():
            self.abort()


class PairwiseDataset:
    """The datasets of one prefix (pairwise, or unpaired), read with megatron-core's `IndexedDataset`
    (memory-mapped)."""

    def __init__(self, prefix: str, unpaired: bool = False):
        _before_megatron()
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        kind = "unpaired" if unpaired else "pairwise"
        missing = [p for p in dataset_files(prefix, unpaired) if not os.path.isfile(p)]
        if missing:
            hint = " with unpaired: true" if unpaired else ""
            raise DpocError([Problem(prefix, "(dataset)", f"incomplete {kind} dataset: missing "
                                     f"{', '.join(missing)} (run dpoc preprocess{hint} to write it)")])
        self.prefix = prefix
        self.datasets = {f: IndexedDataset(dataset_prefix(prefix, f)) for f in fields_of(unpaired)}
        sizes = {f: len(d) for f, d in self.datasets.items()}
        if len(set(sizes.values())) != 1:
            raise DpocError([Problem(prefix, "(dataset)", f"the {len(sizes)} {kind} datasets differ in length "
                                     f"({sizes}); rerun dpoc preprocess")])

    def lengths(self, field: str) -> np.ndarray:
        """Every sequence's length in one dataset, without reading tokens (for length-bucketed batching)."""
        return self.datasets[field].sequence_lengths

    def __len__(self) -> int:
        return len(next(iter(self.datasets.values())))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        import numpy as np

        # copies: megatron views into its memory map, which closes when the dataset is collected
        return {f: np.array(d[index]) for f, d in self.datasets.items()}


def open_pairwise(prefix: str, unpaired: bool = False) -> PairwiseDataset:
    """`open_pairwise(p)[i]` is `{chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels}`;
    unpaired, `{completion_input_ids, completion_labels, desirable}` (`desirable`: one int, 1 or 0)."""
    return PairwiseDataset(prefix, unpaired)
