"""`dpoc report RUN_DIR`: a run's curves from its metrics.jsonl, as a PNG: the loss, and whichever of TRL's
metrics the run's loss logs (rewards, margins, accuracies, log-probs; nll_loss and the log-odds ratio of the
reference-free losses; KTO's KL), one panel each.

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

REQUIRED = ("step", "loss")
PANELS = (  # (metrics drawn together, axis label); a panel is drawn when the run logs one of its metrics
    (("loss",), "loss"),
    (("rewards/margins",), "reward margin (chosen - rejected)"),
    (("rewards/accuracies",), "reward accuracy"),
    (("rewards/chosen", "rewards/rejected"), "rewards"),
    (("logps/chosen", "logps/rejected"), "sequence log-probs"),
    (("nll_loss",), "chosen NLL"),
    (("log_odds_ratio",), "log sigmoid(log-odds ratio)"),
    (("kl",), "KL estimate"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl (runs/<recipe>/)")
    parser.add_argument("-o", "--output", default=None, help="PNG to write (default RUN_DIR/report.png)")


def run(args: argparse.Namespace) -> int:
    metrics_file = Path(args.run_dir) / METRICS_FILE
    records = read_metrics(metrics_file)
    output = Path(args.output) if args.output else Path(args.run_dir) / "report.png"
    draw(records, output, title=f"{args.run_dir}: {len(records)} steps")
    last = records[-1]
    parts = [f"loss {records[0]['loss']:.4f} -> {last['loss']:.4f}"]
    parts += [f"{name} {last[key]:{form}}" for key, name, form in (("rewards/accuracies", "accuracy", ".3f"),
                                                                   ("rewards/margins", "margin", ".4f")) if key in last]
    print(f"{output}: {', '.join(parts)} at step {last['step']}")
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
        missing = [key for key in REQUIRED if key not in record]
        if missing:
            raise DpocError([Problem(str(path), f"line {number}", f"missing {', '.join(missing)}")])
        records.append(record)
    if not records:
        raise DpocError([Problem(str(path), "file", "no steps recorded yet")])
    return records


def present(records: list[dict]) -> list[tuple[tuple[str, ...], str]]:
    """The panels whose metrics the run logs, each with only the metrics it logs."""
    logged = {key for r in records for key in r}
    return [(tuple(k for k in keys if k in logged), label) for keys, label in PANELS if set(keys) & logged]


def draw(records: list[dict], output: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError as exc:
        raise DpocError([Problem(str(output), "report",
                                 "drawing needs matplotlib (valid: pip install 'dpoc[report]')")]) from exc
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    panels = present(records)
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 8 * len(panels) / 3), sharex=True, squeeze=False)
    for axis, (keys, label) in zip(axes[:, 0], panels, strict=True):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            axis.plot(*zip(*points, strict=True), marker="." if len(records) < 50 else None, label=key)
        if len(keys) > 1:
            axis.legend()
        if keys == ("rewards/accuracies",):
            axis.set_ylim(-0.05, 1.05)
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    figure.suptitle(title)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    figure.savefig(partial, format="png", dpi=100)
    plt.close(figure)
    os.replace(partial, output)  # readers never see half a PNG
