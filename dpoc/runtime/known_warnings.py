"""The library warnings every run printed (~40 lines on the tiny CPU job) that say nothing about the run.

The known ones (`dpoc.common.harmless_warnings`, shared with `dpoc preprocess`) are filtered when the runtime
package is first imported, before megatron-core, whose imports raise most of them.

Under torchrun (RANK set) every other warning reaches the log once, from whichever rank raised it first, as
`[rank N] <the usual warning lines>`: a warning only rank 3 raises is shown (it used to be dropped with every
non-zero rank's), and one that all ranks raise is shown once, not once per rank. The ranks of a node agree
through a marker file per warning (`_first_on_node`) in a directory of their torchrun agent; ranks on other
nodes print their own first copy, so a warning every rank raises shows at most once per node. Each rank also
stops after `MAX_SHOWN` distinct warnings (one line says so), so a warning whose text changes every step
cannot flood the log.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from dpoc.common import harmless_warnings

MAX_SHOWN = 20  # distinct warnings one rank shows before it stops (and says so once)


def silence() -> None:
    """The known ones everywhere. Under torchrun every other warning once per node (per place and text, as
    Python's default shows it once per place in a process), prefixed with the rank that raised it
    (`rank_warnings`). PYTHONWARNINGS / -W still rule which warnings show; the prefix stays."""
    harmless_warnings.ignore()
    rank = os.environ.get("RANK")
    if rank is not None:
        marks = None if sys.warnoptions else marker_dir()
        warnings.showwarning = rank_warnings(rank, marks)


MARKS_ENV = "DPOC_WARNING_MARKS"  # the launcher's own temporary directory (`dpoc.runtime.torchrun`)


def marker_dir() -> Path:
    """Where the ranks of this node mark the warnings shown: one directory per torchrun agent (their common
    parent process) and run and restart (a fresh one after a restart: the restarted ranks' warnings show
    again), inside the directory the launcher owns and removes (`MARKS_ENV`), else in the temp directory."""
    job = "-".join(os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                                                     "MASTER_ADDR", "MASTER_PORT"))
    digest = hashlib.sha256(f"{os.getppid()}|{job}".encode()).hexdigest()[:16]
    return Path(os.environ.get(MARKS_ENV) or tempfile.gettempdir()) / f"dpoc-warnings-{digest}"


def _first_on_node(marks: Path, key: str) -> bool:
    """Whether this rank is the first of its node to show warning `key` (an exclusive create of its marker);
    True when the marker cannot be written (a warning is shown twice rather than lost)."""
    try:
        marks.mkdir(parents=True, exist_ok=True)
        os.close(os.open(marks / key, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    except OSError:
        return True
    return True


def rank_warnings(rank: str, marks: Path | None, stream: TextIO | None = None) -> Callable[..., None]:
    """A `warnings.showwarning` that writes `[rank N] ` before Python's usual lines, to `file`, else `stream`,
    else the stderr of the moment; with `marks`, only the node's first copy of each warning (its category, text
    and place); at most `MAX_SHOWN` of them, then one line saying so (a capped rank claims no marker, so a
    warning it no longer shows can still come from another rank)."""
    shown = 0

    def write(text: str, file: TextIO | None) -> None:
        with contextlib.suppress(OSError, ValueError):  # a closed stream: as Python's own showwarning, nothing
            (file or stream or sys.stderr).write(f"[rank {rank}] {text}")

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        nonlocal shown
        if shown >= MAX_SHOWN:
            if shown == MAX_SHOWN:
                shown += 1
                write(f"dpoc: {MAX_SHOWN} warnings shown on this rank; its further warnings are not shown\n", file)
            return
        identity = f"{category.__module__}.{category.__qualname__}|{message}|{filename}|{lineno}"
        if marks is not None and not _first_on_node(marks, hashlib.sha256(identity.encode()).hexdigest()[:32]):
            return
        shown += 1
        write(warnings.formatwarning(message, category, filename, lineno, line), file)

    return show
