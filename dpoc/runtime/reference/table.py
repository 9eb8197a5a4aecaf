"""Training's side of `--dpoc-reference precomputed`: the file the precompute pass wrote, read on rank 0 and
broadcast, then looked up by pair index (on node-local filesystems only node 0, where the pass's rank 0 wrote
it, needs the file; no rank trains before every rank holds the values).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dpoc.contract.errors import DpocError
from dpoc.runtime.reference import reference_file
from dpoc.runtime.step.agree import from_rank0
from dpoc.runtime.step.data import MicroBatch


@dataclass(frozen=True)
class PrecomputedTable:
    """The reference's summed log-probs of every pair, as training looks them up."""

    path: Path
    logps: torch.Tensor  # [pairs, 2] float32

    def fill(self, batch: MicroBatch) -> MicroBatch:
        """`batch` with its rows' reference log-probs ([chosen_1..n, rejected_1..n], the rows' order)."""
        rows = self.logps[list(batch.pair_ids)]
        sums = torch.cat([rows[:, 0], rows[:, 1]]).to(batch.tokens.device)
        return replace(batch, reference_logps=sums)


def shared_table(args: argparse.Namespace, args_file: str, pairs: int) -> PrecomputedTable:
    """Rank 0 reads the current file (a problem when it is missing or stale); every rank gets its values."""
    def read() -> dict:
        try:
            path, logps = reference_file.read(args, args_file, pairs)
        except DpocError as exc:
            return {"problems": exc.problems}
        return {"path": str(path), "logps": logps}

    answer = from_rank0(read)
    if "problems" in answer:
        raise DpocError(answer["problems"])
    return PrecomputedTable(Path(answer["path"]), torch.from_numpy(np.asarray(answer["logps"], dtype=np.float32)))
