"""Collective decisions: every rank acts on one answer, rank 0's, for what needs only one look at files (on
node-local filesystems other nodes may see other files, or none)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def from_rank0(compute: Callable[[], T]) -> T:
    """Rank 0's answer, on every rank (collective; the answer is pickled)."""
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
