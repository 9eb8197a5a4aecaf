"""Run several runtime programs one after another in this process, each as its own launch would run it: alone, or
under torchrun in every rank (`tests/runtime/batched.py` starts it). The tests' cost is the launches (each process
imports torch and megatron-core, each group joins gloo), not the tiny runs, so one launch serves many runs.

    python tests/runtime/batch_driver.py PLAN.json
    python -m torch.distributed.run --nproc-per-node=N ... tests/runtime/batch_driver.py PLAN.json

PLAN.json is a list of `{"module": "dpoc.runtime.train", "argv": ["@x.args"], "out": DIR}`; each case calls
`MODULE.main(argv)` (what `python -m MODULE ARGV` runs) and writes DIR/rank<r>.stdout, .stderr (its file
descriptors 1 and 2 while it runs) and .rc (its exit code). What a fresh launch would give each case:

- its own process group: each case gets its own store on a fresh port (rank 0 announces it through torchrun's
  store), since a re-made default group would reuse the keys of the one before;
- the environment it started with (a one-process run sets RANK, MASTER_PORT, ... itself);
- torch's global generator at a fresh process's seed.

A case that raises (a bug, not an exit code) ends the launch after writing its traceback and rc 1: another
rank may be waiting in a collective for it, and the cases after it would run on whatever it left behind.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import traceback
from pathlib import Path


@contextlib.contextmanager
def _output_to(out: Path, rank: int):
    """File descriptors 1 and 2 (Python's and the C libraries' writes alike) into the case's files."""
    saved = []
    for fd, name in ((1, "stdout"), (2, "stderr")):
        (sys.stdout if fd == 1 else sys.stderr).flush()
        saved.append(os.dup(fd))
        with open(out / f"rank{rank}.{name}", "wb") as f:
            os.dup2(f.fileno(), fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def _own_store(agent, case: int, rank: int) -> None:
    """A fresh store for this case's process group, hosted by rank 0 (TORCHELASTIC_USE_AGENT_STORE off)."""
    from dpoc.common.ports import free_port

    key = f"dpoc-batch/{case}"
    if rank == 0:
        agent.set(key, str(free_port()))
    os.environ["MASTER_PORT"] = agent.get(key).decode()
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"


def main(plan_file: str) -> int:
    import torch

    fresh_seed = torch.initial_seed()
    plan = json.loads(Path(plan_file).read_text())
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    agent = None
    if "TORCHELASTIC_USE_AGENT_STORE" in os.environ:  # under torchrun
        from torch.distributed import TCPStore

        agent = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
    environment = dict(os.environ)
    for i, case in enumerate(plan):
        out = Path(case["out"])
        out.mkdir(parents=True, exist_ok=True)
        os.environ.clear()
        os.environ.update(environment)
        if agent is not None:
            _own_store(agent, i, rank)
        torch.manual_seed(fresh_seed)
        raised = False
        with _output_to(out, rank):
            try:
                code = importlib.import_module(case["module"]).main(case["argv"])
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code, raised = 1, True
        (out / f"rank{rank}.rc").write_text(f"{code or 0}\n")
        if raised:
            sys.stdout.flush()
            os._exit(1)
    return 0


if __name__ == "__main__":  # dist checkpointing spawns helper processes that re-import this module
    sys.exit(main(sys.argv[1]))
