"""An input error (exit 2) on a rank: printed once however many ranks stop on it, and recorded in the run
directory so that the node script can exit 2 although torchrun reports every failed child as exit 1.

The first rank to stop creates `<run_dir>/dpoc_input_error.txt` (linked into place whole, so no rank reads it
half-written) and prints its lines; a rank whose lines are already there stays silent, one with other lines
prints them. The file names the torchrun agent that started the rank, so a file left by an earlier run is
replaced rather than taken for this one's.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from dpoc.contract.errors import Problem
from dpoc.contract.runs import INPUT_ERROR


def report(problems: Sequence[Problem], run_dir: str | None) -> None:
    lines = "".join(f"{p}\n" for p in problems)
    if run_dir is None or _already_reported(Path(run_dir) / INPUT_ERROR, lines):
        return
    sys.stderr.write(lines)


def _already_reported(path: Path, lines: str) -> bool:
    """Record `lines` unless this run recorded them already; True when it had."""
    starter = f"started by {os.environ.get('TORCHELASTIC_RUN_ID', '-')} {os.getppid()}\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
            f.write(starter + lines)
        try:
            os.link(f.name, path)  # atomic and exclusive: the first rank to stop records its lines
            return False
        except FileExistsError:
            recorded = path.read_text()
            if not recorded.startswith(starter):  # an earlier run's: this run's error replaces it
                os.replace(f.name, path)
                return False
            return recorded == starter + lines
        finally:
            Path(f.name).unlink(missing_ok=True)
    except OSError:  # an unwritable run directory: print, as without the file
        return False
