"""Benchmark training checkpoints: save and load seconds of the tiny CPU recipe, through its node script.

    python bench/checkpoint.py [--steps 6] [--smoke] [--out FILE]

Builds recipes/tiny_cpu.yaml into a temporary directory (2 gloo processes, a checkpoint after every step),
preprocesses its data with the build's preprocess.sh, trains, then rebuilds it one step longer and runs the
node script again, which resumes from the last checkpoint. The runtime reports each save's and the load's
seconds in train.log (publishing, fsync and the manifest's hashes included); this script collects them.
Prints a table and writes bench/results/checkpoint.json (`--out` elsewhere; `--smoke` runs 4 steps and writes
nothing unless given `--out`).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._shared import arguments, write_result  # noqa: E402  (the repository first)
from dpoc.compiler.pipeline import build  # noqa: E402

SAVED = re.compile(r"^saved \S+ \(\w+: (\d+) files, ([\d.]+) MB\) in ([\d.]+) s", re.MULTILINE)
LOADED = re.compile(r"^resumed from \S+: .* loaded in ([\d.]+) s", re.MULTILINE)


# the code this benchmark measures: its results' provenance (bench/_shared.provenance)
MEASURES = ("bench/checkpoint.py", "dpoc/runtime", "recipes/tiny_cpu.yaml")


def _run(script: Path, work: Path) -> None:
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{script} failed:\n{done.stderr[-3000:]}")


def measure(steps: int, work: Path) -> dict:
    overrides = [f"dataset.output_prefix={work}/data/orca_tiny", f"run_dir={work}/run", "training.save_interval=1"]
    build(REPO / "recipes" / "tiny_cpu.yaml", [*overrides, f"training.train_iters={steps}"], out=work / "build")
    _run(work / "build" / "preprocess.sh", work)
    _run(work / "build" / "nodes" / "node-0.sh", work)
    build(REPO / "recipes" / "tiny_cpu.yaml", [*overrides, f"training.train_iters={steps + 1}"], out=work / "build")
    _run(work / "build" / "nodes" / "node-0.sh", work)
    log = (work / "run" / "train.log").read_text()
    saves = [(int(files), float(mb), float(s)) for files, mb, s in SAVED.findall(log)]
    loads = [float(s) for s in LOADED.findall(log)]
    return {"processes": 2, "steps": steps, "checkpoint_mb": saves[0][1], "files": saves[0][0],
            "first_save_s": saves[0][2], "save_s_median": statistics.median(s for _, _, s in saves[1:]),
            "saves": len(saves), "load_s": loads[0], "cpu_count": os.cpu_count()}


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], "checkpoint")
    parser.add_argument("--steps", type=int, default=6, help="(--smoke: 4, the recipe warms up for 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dpoc-bench-checkpoint-") as tmp:
        result = measure(4 if args.smoke else args.steps, Path(tmp))
    print(f"{'checkpoint':<12}{'files':>6}{'first save':>12}{'save (median)':>15}{'load':>8}")
    print(f"{result['checkpoint_mb']:>9.1f} MB{result['files']:>6}{result['first_save_s']:>10.2f} s"
          f"{result['save_s_median']:>13.2f} s{result['load_s']:>6.2f} s")
    out = write_result(args, "checkpoint", result, MEASURES)
    if out:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
