"""Median wall time of a `dpoc build` process vs. a process that only imports the compiler's three libraries.

Paired runs, alternating, on the same machine: the ratio says what dpoc itself costs on top of the import
floor a Python tool built on omegaconf/jinja2/jsonschema cannot avoid. Target: <= 1.5x.

    python bench/compile_latency.py [--runs 21] [--recipe recipes/qwen3_30b.yaml] [--smoke] [--out FILE]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._shared import arguments, write_result  # noqa: E402

# the code this benchmark measures: its results' provenance (bench/_shared.provenance)
MEASURES = ("bench/compile_latency.py", "dpoc", "recipes/qwen3_30b.yaml", "templates", "schemas")


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], "compile_latency")
    parser.add_argument("--runs", type=int, default=21, help="paired runs (--smoke: 1)")
    parser.add_argument("--recipe", default="recipes/qwen3_30b.yaml")
    args = parser.parse_args()
    if args.smoke:
        args.runs = 1
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        def build(run: int) -> list[str]:  # a new directory per run: every run writes the whole build
            return [sys.executable, "-m", "dpoc", "build", args.recipe, "-o", f"{tmp}/out{run}"]

        floor = [sys.executable, "-c", "import omegaconf, jinja2, jsonschema"]
        timed(build(-1), env), timed(floor, env)  # warm the page cache and bytecode
        pairs = [(timed(build(run), env), timed(floor, env)) for run in range(args.runs)]
    b, f = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    ratios = [p[0] / p[1] for p in pairs]
    result = {"recipe": args.recipe, "runs": args.runs, "build_median_s": round(b, 4), "imports_median_s": round(f, 4),
              "ratio_of_medians": round(b / f, 3), "median_paired_ratio": round(statistics.median(ratios), 3),
              "python": sys.version.split()[0]}
    print(f"{'dpoc build':<28}{b * 1000:8.1f} ms (median of {args.runs})")
    print(f"{'import omegaconf,jinja2,...':<28}{f * 1000:8.1f} ms")
    print(f"{'ratio (median of pairs)':<28}{result['median_paired_ratio']:8.2f} x   (target <= 1.5)")
    write_result(args, "compile_latency", result, MEASURES)


if __name__ == "__main__":
    main()
