"""An input error (exit 2) on a rank: printed once however many ranks stop on it, and recorded where the node
script said (`DPOC_INPUT_ERROR`), so that it can exit 2 although torchrun reports every failed child as exit 1.

The first rank to stop creates the file (linked into place whole, so no rank reads it half-written) and prints
its lines; a rank whose lines are already there stays silent, one with other lines prints them. Without the
variable (torchrun started by hand) every rank prints its lines, as nothing can tell them apart.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from dpoc.contract.errors import Problem
from dpoc.contract.runs import INPUT_ERROR_ENV


def report(problems: Sequence[Problem]) -> None:
    lines = "".join(f"{p}\n" for p in problems)
    target = os.environ.get(INPUT_ERROR_ENV)
    if not target or not _already_recorded(Path(target), lines):
        sys.stderr.write(lines)


def _already_recorded(path: Path, lines: str) -> bool:
    """Record `lines` unless a rank of this node did; True when it had, with the same lines."""
    try:
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
            f.write(lines)
        try:
            os.link(f.name, path)  # atomic and exclusive: the first rank to stop records its lines
            return False
        except FileExistsError:
            return path.read_text() == lines
        finally:
            Path(f.name).unlink()
    except OSError:  # an unwritable place: print, as without the variable
        return False
