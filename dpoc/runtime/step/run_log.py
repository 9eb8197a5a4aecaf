"""What a run leaves for people and tools: `metrics.jsonl`, `train.log` with one progress line per step,
and TensorBoard scalars when tensorboard is installed and `--tensorboard-dir` is given.

One quantity, one name for people: the progress line says pairs/s, as the planner does. `metrics.jsonl` keeps
the key `samples_per_s` (DESIGN's contract, MindSpeed's word): one sample is one preference pair.

A run resumed at step k keeps `metrics.jsonl`'s rows up to k and drops the later ones (an interrupted run
logged them after its last checkpoint; the resumed run logs them again), so each step appears once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from dpoc.common.atomic import write_atomically
from dpoc.contract.runs import METRICS as METRICS_FILE

LOG_FILE = "train.log"
# the progress line's metrics besides the loss, each where the loss logs it: (label, metrics key, format)
_SHOWN = (("acc", "rewards/accuracies", ".3f"), ("margin", "rewards/margins", ".4f"), ("kl", "kl", ".4f"))


class RunLog:
    def __init__(self, run_dir: str, total_steps: int, first_step: int, tensorboard_dir: str | None):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        mode = "w" if first_step == 0 else "a"
        if first_step:
            keep_steps_through(self.dir / METRICS_FILE, first_step)
        self.metrics = open(self.dir / METRICS_FILE, mode, encoding="utf-8")  # noqa: SIM115 (lives with the run)
        self.log = open(self.dir / LOG_FILE, mode, encoding="utf-8")  # noqa: SIM115
        self.total_steps = total_steps
        self.first_step = first_step
        self.started = time.perf_counter()
        self.tensorboard = _tensorboard_writer(tensorboard_dir)

    def line(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def step(self, record: dict[str, float]) -> None:
        """Append the step's metrics (flushed, so a killed run keeps every finished step) and print."""
        self.metrics.write(json.dumps(record, sort_keys=False) + "\n")
        self.metrics.flush()
        step = int(record["step"])
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, step)
        done = step - self.first_step
        eta = (time.perf_counter() - self.started) / done * (self.total_steps - step)
        shown = [f"{name} {record[key]:{form}}" for name, key, form in _SHOWN if key in record]
        self.line(f"step {step}/{self.total_steps} | loss {record['loss']:.4f} | {' | '.join(shown)}"
                  f"{' | ' if shown else ''}lr {record['lr']:.3g} | grad norm {record['grad_norm']:.3f} | "
                  f"{record['samples_per_s']:.2f} pairs/s | {record['tokens_per_s']:.0f} tokens/s | "
                  f"ETA {_clock(eta)}")

    def close(self) -> None:
        self.metrics.close()
        self.log.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def keep_steps_through(path: Path, step: int) -> None:
    """Drop the rows logged after `step`, atomically (the file is replaced whole)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        write_atomically(path, "".join(kept))


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _tensorboard_writer(directory: str | None):
    if not directory:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; the JSON lines carry the same numbers
        return None
    return SummaryWriter(log_dir=directory)
