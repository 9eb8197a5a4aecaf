"""User-facing errors: one line per problem, `<file>: <where>: <what> (<numbers>; valid: <alternatives>)`.

Every command raises `DpocError` for bad input; the CLI prints its lines to stderr and exits 2, with no
traceback. `where` is a dotted recipe field (`parallelism.tp`) or a place in a file (`line 17`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped on SIGTERM after saving a checkpoint; run again to resume


@dataclass(frozen=True)
class Problem:
    """One bad input: the file, the dotted field (or `(file)`) and what is wrong with what would be valid."""
    file: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: {self.message}"


def suggest(name: str, known: list[str]) -> str:
    """`did you mean 'x'? ` for the closest known name (a longer name it starts, else the most similar), or ''."""
    import difflib

    close = [k for k in known if k.startswith(name)] or difflib.get_close_matches(name, known, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


# the names users bring from TRL's DPOConfig and transformers' TrainingArguments -> the recipe field, and how
# the value changes (tests/compiler/test_malformed.py checks every target against the recipe schema)
FOREIGN_NAMES = {
    "learning_rate": ("training.lr", ""),
    "lr_scheduler_type": ("training.lr_decay_style", ""),
    "warmup_steps": ("training.warmup_iters", ""),
    "warmup_ratio": ("training.warmup_iters", ", in steps: the ratio times training.train_iters"),
    "max_steps": ("training.train_iters", ""),
    "num_train_epochs": ("training.train_iters", ", in optimizer steps: epochs times pairs / global_batch_size"),
    "per_device_train_batch_size": ("parallelism.micro_batch_size", ""),
    "gradient_accumulation_steps": ("training.global_batch_size", ", the pairs per optimizer step: micro_batch_size "
                                    "x data-parallel size x accumulation steps"),
    "max_length": ("training.seq_length", ""),
    "max_grad_norm": ("training.clip_grad", ""),
    "adam_epsilon": ("training.adam_eps", ""),
    "bf16": ("training.precision", ": bf16"),
    "fp16": ("training.precision", ": fp16"),
    "logging_steps": ("training.log_interval", ""),
    "save_steps": ("training.save_interval", ""),
    "save_total_limit": ("checkpoint.keep", ""),
    "padding_free": ("training.packing", ""),
    "beta": ("dpo.beta", ""),
    "loss_type": ("dpo.loss", ""),
    "rpo_alpha": ("dpo.sft_weight", ""),
    "precompute_ref_log_probs": ("dpo.reference", ": precomputed"),
    "model_name_or_path": ("model.hf_weights", ""),
    "output_dir": ("run_dir", ""),
}


def foreign_name(name: str) -> str:
    """`did you mean 'training.lr'? (TRL's and transformers' learning_rate) ` for a name from TRL / HF, or ''."""
    if name not in FOREIGN_NAMES:
        return ""
    field, how = FOREIGN_NAMES[name]
    return f"did you mean {field!r}{how}? ({name} is TRL's / transformers' name); "


def counted(n: int, noun: str) -> str:
    """`1 node`, `2 nodes`: what every message says of a count."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


class DpocError(Exception):
    """One or more problems with the user's input; never a bug in dpoc."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
