"""Median wall time of a `dpoc build` process vs. a process that only imports the compiler's three libraries.

Paired runs, alternating, on the same machine: the ratio says what dpoc itself costs on top of the import
floor a Python tool built on omegaconf/jinja2/jsonschema cannot avoid. Target: <= 1.2x. Each run's CPU time
(user + system, from the child's rusage) is reported too: on a shared, loaded machine it moves far less
than wall time, and the load average before and after says how loaded the machine was.

    python bench/compile_latency.py [--runs 21] [--recipe recipes/qwen3_30b.yaml] [--smoke] [--out FILE]
"""

from __future__ import annotations

import os
import resource
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


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one run of `cmd`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], "compile_latency")
    parser.add_argument("--runs", type=int, default=21, help="paired runs (--smoke: 1)")
    parser.add_argument("--recipe", default="recipes/qwen3_30b.yaml")
    args = parser.parse_args()
    if args.smoke:
        args.runs = 1
    # bytecode is written and read as an installed package's would be (pip compiles it): with
    # PYTHONDONTWRITEBYTECODE set, every build would compile dpoc's modules from source again (~50 ms), while the
    # libraries' .pyc files already lie in site-packages
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}, "PYTHONPATH": str(REPO)}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        def build(run: int) -> list[str]:  # a new directory per run: every run writes the whole build
            return [sys.executable, "-m", "dpoc", "build", args.recipe, "-o", f"{tmp}/out{run}"]

        floor = [sys.executable, "-c", "import omegaconf, jinja2, jsonschema"]
        timed(build(-1), env), timed(floor, env)  # warm the page cache and bytecode
        pairs = [(timed(build(run), env), timed(floor, env)) for run in range(args.runs)]
    b, f = statistics.median(p[0][0] for p in pairs), statistics.median(p[1][0] for p in pairs)
    b_cpu, f_cpu = statistics.median(p[0][1] for p in pairs), statistics.median(p[1][1] for p in pairs)
    result = {"recipe": args.recipe, "runs": args.runs, "build_median_s": round(b, 4), "imports_median_s": round(f, 4),
              "ratio_of_medians": round(b / f, 3),
              "median_paired_ratio": round(statistics.median(p[0][0] / p[1][0] for p in pairs), 3),
              "build_cpu_median_s": round(b_cpu, 4), "imports_cpu_median_s": round(f_cpu, 4),
              "cpu_ratio_of_medians": round(b_cpu / f_cpu, 3),
              "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
              "python": sys.version.split()[0]}
    print(f"{'dpoc build':<28}{b * 1000:8.1f} ms wall {b_cpu * 1000:8.1f} ms CPU (medians of {args.runs})")
    print(f"{'import omegaconf,jinja2,...':<28}{f * 1000:8.1f} ms wall {f_cpu * 1000:8.1f} ms CPU")
    print(f"{'ratio (median of pairs)':<28}{result['median_paired_ratio']:8.2f} x wall "
          f"{result['cpu_ratio_of_medians']:8.2f} x CPU (target <= 1.2)")
    print(f"{'load average before, after':<28}{result['load_average_before_after']}")
    write_result(args, "compile_latency", result, MEASURES)


if __name__ == "__main__":
    main()
