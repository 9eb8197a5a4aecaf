"""Publishing a directory atomically: written into a temporary sibling, every file fsynced, renamed into place.

A reader sees the whole directory or none of it, even after a crash or a power cut halfway through; a
failure removes the sibling and leaves no trace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dpoc.contract.errors import DpocError, Problem


@contextlib.contextmanager
def published_dir(target: str | Path, field: str = "OUT_DIR") -> Iterator[Path]:
    """Yields an empty staging directory next to `target`; on a clean exit it becomes `target`. An existing
    `target` is refused (`field` names it in the message) rather than replaced."""
    target = Path(target)
    if target.exists():
        raise DpocError([Problem(str(target), field, "already exists (valid: remove it, or name another directory)")])
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700, as mkdir would have made it
    try:
        yield staging
        sync_tree(staging)
        os.rename(staging, target)
        _fsync(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def sync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (files first), so a rename publishes durable data."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
