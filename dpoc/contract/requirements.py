"""What a target's program imports on a node: the target declares it, the node preflight checks it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Requirement:
    """A package the runtime imports: the module, its distribution, and [minimum, below) versions (None: any)."""

    module: str
    dist: str
    minimum: tuple[int, ...] | None = None
    below: tuple[int, ...] | None = None


TORCH_NPU = Requirement("torch_npu", "torch_npu", (2, 5))  # on Ascend, for either target
