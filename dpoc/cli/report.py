"""`dpoc report RUN_DIR`: a run's loss, reward-margin and accuracy curves from its metrics.jsonl, as a PNG.

matplotlib is optional (the `report` extra); the import happens only here, so the rest of dpoc never
needs it. Reads only the run directory, so it works while a run is still writing.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from dpoc.contract.errors import DpocError, Problem
from dpoc.runtime.step.run_log import METRICS_FILE

PANELS = (("loss", "DPO loss"), ("rewards/margins", "reward margin (chosen - rejected)"),
          ("rewards/accuracies", "reward accuracy"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl (runs/<recipe>/)")
    parser.add_argument("-o", "--output", default=None, help="PNG to write (default RUN_DIR/report.png)")


def run(args: argparse.Namespace) -> int:
    metrics_file = Path(args.run_dir) / METRICS_FILE
    records = read_metrics(metrics_file)
    output = Path(args.output) if args.output else Path(args.run_dir) / "report.png"
    draw(records, output, title=f"{args.run_dir}: {len(records)} steps")
    print(f"{output}: loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}, accuracy "
          f"{records[-1]['rewards/accuracies']:.3f}, margin {records[-1]['rewards/margins']:.4f} at step "
          f"{records[-1]['step']}")
    return 0


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise DpocError([Problem(str(path), "file", "no metrics here (valid: a run directory the runtime "
                                                    "wrote, e.g. runs/<recipe name>)")])
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DpocError([Problem(str(path), f"line {number}", f"not JSON ({exc.msg})")]) from exc
        missing = [key for key, _ in PANELS if key not in record] + (["step"] if "step" not in record else [])
        if missing:
            raise DpocError([Problem(str(path), f"line {number}", f"missing {', '.join(missing)}")])
        records.append(record)
    if not records:
        raise DpocError([Problem(str(path), "file", "no steps recorded yet")])
    return records


def draw(records: list[dict], output: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError as exc:
        raise DpocError([Problem(str(output), "report",
                                 "drawing needs matplotlib (valid: pip install 'dpoc[report]')")]) from exc
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps = [r["step"] for r in records]
    figure, axes = plt.subplots(len(PANELS), 1, figsize=(8, 8), sharex=True)
    for axis, (key, label) in zip(axes, PANELS, strict=True):
        axis.plot(steps, [r[key] for r in records], marker="." if len(records) < 50 else None)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[-1].set_ylim(-0.05, 1.05)
    figure.suptitle(title)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    figure.savefig(partial, format="png", dpi=100)
    plt.close(figure)
    os.replace(partial, output)  # readers never see half a PNG
