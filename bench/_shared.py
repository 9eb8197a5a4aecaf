"""What every benchmark shares: `--smoke` (tiny sizes, so CI runs each one and none can rot), `--out` (the
result JSON: `bench/results/<name>.json` by default; a smoke run writes none unless given `--out`, so it
never overwrites the real results; every result is checked against `bench/schemas/<name>.schema.json`, field by
field, before it is written), and the one timer and matmul-rate probe the FLOPs figures divide by."""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dpoc.common.atomic import write_atomically

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMAS = RESULTS.parent / "schemas"
REPO = RESULTS.parent.parent


def arguments(description: str, name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, overriding the size options: checks that the benchmark runs (for CI); "
                             "its numbers mean nothing")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"result JSON (default: bench/results/{name}.json; none for --smoke)")
    return parser


def write_result(args: argparse.Namespace, name: str, data: dict[str, Any], measures: Sequence[str]) -> Path | None:
    """Write `data` with its `provenance(measures)` atomically where `args` says; returns the path (None: a smoke
    run without --out)."""
    out = args.out if args.out is not None else None if args.smoke else RESULTS / f"{name}.json"
    if out is None:
        return None
    text = json.dumps({**data, **provenance(measures)}, indent=2, sort_keys=True) + "\n"
    check_result(name, json.loads(text))  # what the file will hold: tuples as arrays, keys as strings
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, text)
    return out


def schema_problems(name: str, result: Any) -> list[str]:
    """Each field of `result` that `bench/schemas/<name>.schema.json` does not allow, as `FIELD: what is wrong`
    (the schema's file name is its URI, so its `$ref`s to `provenance.schema.json` resolve offline)."""
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    schemas = {p.name: json.loads(p.read_text()) for p in SCHEMAS.glob("*.schema.json")}
    if f"{name}.schema.json" not in schemas:
        return [f"(top level): no schema bench/schemas/{name}.schema.json"]
    registry = Registry().with_resources((n, Resource.from_contents(s)) for n, s in schemas.items())
    validator = Draft202012Validator(schemas[f"{name}.schema.json"], registry=registry)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}"
                  for e in validator.iter_errors(result))


def smoke_problems(name: str, result: dict[str, Any]) -> list[str]:
    """What is wrong with a smoke run's `result`: top-level keys other than the committed result's, fields its
    schema does not allow, or a commit other than the one checked out."""
    committed = json.loads((RESULTS / f"{name}.json").read_text())
    problems = [] if sorted(result) == sorted(committed) else [f"keys {sorted(result)}, committed {sorted(committed)}"]
    head = _git("rev-parse", "HEAD").strip()
    if result.get("measured_commit") != head:
        problems.append(f"measured_commit: {result.get('measured_commit')} is not HEAD {head}")
    return problems + schema_problems(name, result)


def result_digests() -> dict[str, str]:
    """The sha256 of every committed result, to show that a smoke run changed none."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(RESULTS.glob("*.json"))}


def check_result(name: str, result: Any) -> None:
    """Refuse a result its schema does not allow, naming every wrong field (nothing is written then)."""
    problems = schema_problems(name, result)
    if problems:
        raise ValueError(f"bench/results/{name}.json does not match bench/schemas/{name}.schema.json: "
                         + "; ".join(problems))


def best_seconds(work: Callable[[], object], repeats: int, device: str = "cpu") -> float:
    """The fastest of `repeats` timed calls of `work`, after one warm-up call (the best time is the one a busy
    moment on a shared machine did not stretch); on cuda each call is timed until its kernels finish."""
    def call() -> None:
        work()
        if device == "cuda":
            import torch

            torch.cuda.synchronize()

    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def square_matmul_rate(n: int, repeats: int, device: str = "cpu") -> float:
    """FLOP/s of an n x n by n x n fp32 product (torch.mm into a preallocated output) on `device`, at torch's
    current thread count on the CPU: the best of `repeats`."""
    import torch

    a, b, c = (torch.randn(n, n, device=device), torch.randn(n, n, device=device), torch.empty(n, n, device=device))
    return 2 * n**3 / best_seconds(lambda: torch.mm(a, b, out=c), repeats, device)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def provenance(measures: Sequence[str]) -> dict[str, Any]:
    """What a result measured, so a reader can tell when it went stale: the commit checked out, the paths (from
    the repository root) of the code it measures, and those of them that differed from that commit (then the
    commit alone does not say what ran; `null` in results backfilled from `git log`, where nobody knows)."""
    missing = [p for p in measures if not (REPO / p).exists()]
    if missing:
        raise ValueError(f"measured paths not in the tree: {missing}")
    changed = _git("status", "--porcelain", "--", *measures).splitlines()
    return {"measured_commit": _git("rev-parse", "HEAD").strip(), "measured_paths": sorted(measures),
            "measured_uncommitted": sorted(line[3:] for line in changed)}


def changes_since(result: dict[str, Any]) -> list[str]:
    """The commits (`hash subject`, newest first) that changed a result's measured code since it was measured."""
    return _git("log", "--format=%h %s", f"{result['measured_commit']}..HEAD", "--",
                *result["measured_paths"]).splitlines()
