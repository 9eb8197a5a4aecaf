"""SIGTERM is a preemption notice: every rank stops at the same step boundary, saves, and exits EXIT_PREEMPTED.

The signal may reach some ranks only (the node script signals its own node's workers), and a handler runs
between Python bytecodes, so it only raises a flag; after each step one all-reduce of the flags tells every
rank whether any was asked to stop. torchrun does not pass a worker's exit code on (it exits 1), so the
checkpoint's writer also leaves `<save>/dpoc_preempted.txt`, which the node script reports.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from dpoc.runtime.model.device import Device


class Preemption:
    def __init__(self, enabled: bool):
        """Without a save directory there is nothing to save: SIGTERM keeps its default (terminate)."""
        self.enabled = enabled
        self.requested = False
        if enabled:
            signal.signal(signal.SIGTERM, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, device: Device) -> bool:
        """Collective: whether any rank got SIGTERM."""
        if not self.enabled:
            return False
        flag = torch.tensor([float(self.requested)], device=device.current())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
