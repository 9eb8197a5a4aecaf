"""What every benchmark shares: `--smoke` (tiny sizes, so CI runs each one and none can rot), `--out` (the
result JSON: `bench/results/<name>.json` by default; a smoke run writes none unless given `--out`, so it
never overwrites the real results), and the one timer and matmul-rate probe the FLOPs figures divide by."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpoc.common.atomic import write_atomically

RESULTS = Path(__file__).resolve().parent / "results"


def arguments(description: str, name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, overriding the size options: checks that the benchmark runs (for CI); "
                             "its numbers mean nothing")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"result JSON (default: bench/results/{name}.json; none for --smoke)")
    return parser


def write_result(args: argparse.Namespace, name: str, data: dict[str, Any]) -> Path | None:
    """Write `data` atomically where `args` says; returns the path (None: a smoke run without --out)."""
    out = args.out if args.out is not None else None if args.smoke else RESULTS / f"{name}.json"
    if out is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return out


def best_seconds(work: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` timed calls of `work`, after one warm-up call (the best time is the one a busy
    moment on a shared machine did not stretch)."""
    work()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def square_matmul_rate(n: int, repeats: int) -> float:
    """FLOP/s of an n x n by n x n fp32 product (torch.mm into a preallocated output) at torch's current thread
    count: the best of `repeats`."""
    import torch

    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    return 2 * n**3 / best_seconds(lambda: torch.mm(a, b, out=c), repeats)
