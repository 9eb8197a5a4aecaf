"""bench/gpu_check.sh's comparisons: each one-device layout of the tiny recipe against the base run.

    python bench/_gpu_check.py compare --precision bf16 --out FILE.json BASE_RUN_DIR NAME=RUN_DIR ...

Before any update every layout holds the same weights (the same seed), so step 1's policy log-probs and gradient
norm, and the loss after the first update, must agree within the precision's rounding; each run's median pairs/s
after its first step is reported beside. Exit 1 when a layout disagrees (the JSON is written either way).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpoc.common.atomic import write_atomically  # noqa: E402

# relative for log-probs and the gradient norm, absolute for the loss after one update
TOLERANCE = {"bf16": {"logps": 2e-2, "grad_norm": 5e-2, "loss after one update": 1e-2},
             "fp32": {"logps": 1e-4, "grad_norm": 1e-3, "loss after one update": 1e-4}}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def differences(run: list[dict], base: list[dict]) -> dict[str, float]:
    first, ref = run[0], base[0]
    logps = max(abs(first[k] - ref[k]) / abs(ref[k]) for k in ("logps/chosen", "logps/rejected"))
    return {"logps": logps, "grad_norm": abs(first["grad_norm"] - ref["grad_norm"]) / abs(ref["grad_norm"]),
            "loss after one update": abs(run[1]["loss"] - base[1]["loss"])}


def pairs_per_s(run: list[dict]) -> float:
    return statistics.median(r["samples_per_s"] for r in run[1:])


def compare(base_dir: Path, runs: dict[str, Path], precision: str) -> dict:
    base = metrics(base_dir)
    tolerance = TOLERANCE[precision]
    rows = {}
    for name, run_dir in runs.items():
        run = metrics(run_dir)
        diffs = differences(run, base)
        rows[name] = {"differences": diffs, "agrees": all(diffs[k] <= tolerance[k] for k in tolerance),
                      "pairs_per_s_median": pairs_per_s(run), "steps": len(run)}
    return {"precision": precision, "tolerance": tolerance, "base": {"pairs_per_s_median": pairs_per_s(base),
            "losses": [r["loss"] for r in base], "steps": len(base)}, "layouts": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare")
    cmp.add_argument("--precision", choices=sorted(TOLERANCE), required=True)
    cmp.add_argument("--out", type=Path, required=True)
    cmp.add_argument("base", type=Path)
    cmp.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    args = parser.parse_args(argv)
    runs = dict(item.split("=", 1) for item in args.runs)
    result = compare(args.base, {name: Path(path) for name, path in runs.items()}, args.precision)
    write_atomically(args.out, json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"base: {result['base']['pairs_per_s_median']:.1f} pairs/s, losses "
          + " ".join(f"{x:.4f}" for x in result["base"]["losses"]))
    for name, row in result["layouts"].items():
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in row["differences"].items())
        print(f"{name:24s} {'agrees' if row['agrees'] else 'DISAGREES'} ({diffs}); "
              f"{row['pairs_per_s_median']:.1f} pairs/s")
    return 0 if all(row["agrees"] for row in result["layouts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
