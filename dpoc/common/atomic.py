"""Publishing atomically, the one implementation: a file, a new directory, a directory replaced whole, or a set
of files swapped in together. Each is written beside its target, made durable (fsynced; a directory by one
sync of its filesystem where Linux has syncfs), and renamed into place.

A reader sees the old state or the new one, never a mix, even after a crash or a power cut halfway through;
a failure removes what it staged and leaves no trace. Builds, datasets, checkpoints, the converter's output,
the precomputed reference and the benchmarks' results all publish through here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from dpoc.contract.errors import DpocError, Problem


def write_atomically(path: str | Path, content: str | bytes, before_rename: Callable[[], None] | None = None) -> None:
    """Replace `path` whole or not at all: a temporary sibling (`temporary_name`), fsynced, renamed over it.
    `before_rename` (tests) runs when the sibling is complete."""
    path = Path(path)
    tmp = path.with_name(f"{temporary_name(path.name)}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)


def temporary_name(name: str) -> str:
    """The prefix of `write_atomically`'s sibling of `name` (a writer killed before its rename leaves it)."""
    return f".{name}.tmp-"


@contextlib.contextmanager
def published_dir(target: str | Path, field: str = "OUT_DIR") -> Iterator[Path]:
    """Yields an empty staging directory next to `target`; on a clean exit it becomes `target`. An existing
    `target` is refused (`field` names it in the message) rather than replaced."""
    target = Path(target)
    if target.exists():
        raise DpocError([Problem(str(target), field, "already exists (valid: remove it, or name another directory)")])
    with _staging(target) as staging:
        yield staging
        sync_tree(staging)
        os.rename(staging, target)
        fsync_path(target.parent)


@contextlib.contextmanager
def replaced_dir(target: str | Path) -> Iterator[Path]:
    """Yields an empty staging directory next to `target`; on a clean exit it replaces `target` whole (an
    existing one is moved aside, and put back if the swap fails)."""
    target = Path(target)
    with _staging(target) as staging:
        yield staging
        sync_tree(staging)
        aside = None
        if target.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, aside / target.name)
        try:
            os.replace(staging, target)
        except BaseException:
            if aside is not None:
                os.replace(aside / target.name, target)
            raise
        finally:
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
        fsync_path(target.parent)


def swap_in(files: Sequence[tuple[str | Path, str | Path]], aside: Path) -> None:
    """Move each staged file (`new`, `dest`) over its destination, all or none: existing destinations are
    moved into the empty directory `aside` first and put back if placing any new file fails."""
    moved_aside, placed = [], []
    try:
        for _, dest in files:
            if os.path.lexists(dest):
                os.replace(dest, aside / os.path.basename(dest))
                moved_aside.append(dest)
        for new, dest in files:
            fsync_path(new)
            os.replace(new, dest)
            placed.append(dest)
    except BaseException:
        for dest in placed:
            os.remove(dest)
        for dest in moved_aside:
            os.replace(aside / os.path.basename(dest), dest)
        raise
    for directory in sorted({os.path.dirname(os.path.abspath(dest)) for _, dest in files}):
        fsync_path(directory)


def sync_tree(root: Path) -> None:
    """Make every file and directory under `root` durable, so a rename publishes durable data: one syncfs of
    its filesystem on Linux (one journal commit, where an fsync per file costs one each: 30 fsyncs were most
    of a `dpoc build`), else an fsync of every file and directory, files first."""
    if _syncfs(root):
        return
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


def _syncfs(path: Path) -> bool:
    """syncfs(2) of the filesystem holding `path`; False where the platform has none. Since Linux 5.8 it
    reports the filesystem's writeback errors, raised here as OSError."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    if syncfs is None:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error), str(path))
    finally:
        os.close(fd)
    return True


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a directory's entry list: what a rename changed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700, as mkdir would have made it
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
