"""Count the collectives the runtime issues, per training step: `python -m tests.runtime.collectives_probe OUT
@megatron.args` (under torchrun) runs `dpoc.runtime.train` with torch.distributed's primitive collectives
wrapped, and writes `OUT/rank-<r>.json`: per step (0 = before the first), each call's op, group size and
bytes. A step starts where the training loop asks for its micro-batches (`rank_micro_batches`). Wrapped
before the runtime imports anything, in both namespaces its callers reach them by (`torch.distributed` and
`distributed_c10d`, which the object collectives call), so the device bridge's gloo fallbacks are counted as
the primitives they run; composite helpers (`broadcast_object_list`, `batch_isend_irecv`) are counted by the
primitives they call.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

PRIMITIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
              "send", "recv", "isend", "irecv", "all_to_all_single", "all_to_all", "barrier", "reduce",
              "gather", "scatter", "_reduce_scatter_base", "_all_gather_base")


def _bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_bytes(v) for v in value)
    return 0


class Recorder:
    def __init__(self) -> None:
        self.step = 0
        self.calls: list[dict] = []
        self.depth = 0  # a wrapped primitive calling another (all_gather_into_tensor's fallback) counts once
        self.installed = False

    def wrap(self, name: str, func):
        @functools.wraps(func)
        def counted(*args, **kwargs):
            if self.depth == 0:
                group = kwargs.get("group")
                if group is None:
                    group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
                first = args[0] if args else next(iter(kwargs.values()), None)
                self.calls.append({"step": self.step, "op": name, "group": dist.get_world_size(group),
                                   "bytes": _bytes(first)})
            self.depth += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.depth -= 1
        return counted

    def install(self) -> None:
        for name in PRIMITIVES:
            original = getattr(distributed_c10d, name, None)
            if original is None:
                continue
            counted = self.wrap(name, original)
            setattr(distributed_c10d, name, counted)
            if getattr(dist, name, None) is original:
                setattr(dist, name, counted)


RECORDER = Recorder()


def main(argv: list[str]) -> int:
    """One run counted. The wrappers go in once per process (before the runtime's first import, so a name it
    binds at import is a wrapper too) and count into RECORDER, which each run starts afresh."""
    out, rest = Path(argv[0]), argv[1:]
    from_start = not RECORDER.installed
    if from_start:
        RECORDER.install()
        RECORDER.installed = True
    RECORDER.step, RECORDER.calls = 0, []
    from dpoc.runtime import train

    if from_start:
        loader = train.rank_micro_batches

        def next_step(*args, **kwargs):
            RECORDER.step += 1
            return loader(*args, **kwargs)

        train.rank_micro_batches = next_step
    code = train.main(rest)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(RECORDER.calls))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
