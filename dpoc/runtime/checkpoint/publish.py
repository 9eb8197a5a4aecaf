"""The save directory on disk: crash-safe publishing of checkpoint folders, their manifests, the tracker.

A save directory holds `iter_NNNNNNN/` folders (Megatron-LM's names) and `latest_checkpointed_iteration.txt`.
A folder is written under a temporary sibling name (`iter_NNNNNNN.tmp-<token>`), every file fsynced and
listed with its size and sha256 in `dpoc_manifest.json`, then renamed into place and its parent fsynced;
the tracker is replaced last (temporary file + rename). A crash therefore leaves either the previous
checkpoints untouched plus a temporary folder (ignored, then cleaned), or the new folder complete.
Loading checks a folder against its manifest and names the first file that is missing, short or altered.

Plain files only, no torch: the node preflight (`dpoc preflight`) imports this module too. Hashing is split
across ranks by the caller (`share`), so a large checkpoint is read once, in parallel.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from dpoc.common.atomic import fsync_path, write_atomically
from dpoc.contract.errors import DpocError, Problem
from dpoc.contract.runs import MANIFEST, METRICS, TRACKER, folder_name

_FOLDER = re.compile(r"iter_(\d{7})")
_STAGING = re.compile(r"iter_\d{7}\.tmp-.+")
_CHUNK = 1 << 22


def iterations(root: str | Path) -> list[int]:
    """Iterations of the published folders under `root`, newest first (temporary folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = (_FOLDER.fullmatch(p.name) for p in root.iterdir() if p.is_dir())
    return sorted((int(m.group(1)) for m in found if m), reverse=True)


def staging_folder(root: str | Path, iteration: int, token: str) -> Path:
    return Path(root) / f"{folder_name(iteration)}.tmp-{token}"


def remove_staging(root: str | Path) -> list[Path]:
    """Delete the temporary folders a killed save left behind; returns them."""
    root = Path(root)
    stale = sorted(p for p in root.iterdir() if p.is_dir() and _STAGING.fullmatch(p.name)) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path)
    return stale


def share(names: Iterable[str], rank: int, world: int) -> list[str]:
    """This rank's part of a folder's files (sorted, dealt round-robin), so ranks hash in parallel."""
    return sorted(names)[rank::world]


def file_records(folder: Path, names: Iterable[str]) -> dict[str, dict[str, int | str]]:
    """fsync each file and record its size and sha256."""
    return {name: _fsync_and_hash(folder / name) for name in names}


def _fsync_and_hash(path: Path) -> dict[str, int | str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return {"size": size, "sha256": digest.hexdigest()}


def files_of(folder: Path) -> list[str]:
    """Every file under `folder` (relative, `/`-separated), the manifest excluded."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def publish(staging: Path, records: dict[str, dict[str, int | str]], root: Path, iteration: int) -> Path:
    """Write the manifest, rename the folder into place, then point the tracker at it (rank 0 only).

    A folder of the same iteration already in place (a replayed save) is moved aside first and removed
    after the new one is in."""
    write_atomically(staging / MANIFEST, json.dumps({"iteration": iteration, "files": records}, indent=1,
                                                     sort_keys=True) + "\n")
    for directory in sorted({(staging / name).parent for name in records}, reverse=True):
        fsync_path(directory)
    final = root / folder_name(iteration)
    aside = None
    if final.exists():
        aside = staging_folder(root, iteration, f"replaced-{staging.name.rsplit('-', 1)[-1]}")
        os.rename(final, aside)
    os.rename(staging, final)
    fsync_path(root)
    write_atomically(root / TRACKER, f"{iteration}\n")
    if aside is not None:
        shutil.rmtree(aside)
    return final


def prune(root: Path, keep: int) -> list[int]:
    """Remove all but the `keep` newest published folders (renamed to a temporary name first, so a crash
    mid-removal leaves only a temporary folder); returns the iterations removed."""
    removed = iterations(root)[keep:]
    for iteration in removed:
        doomed = staging_folder(root, iteration, "pruned")
        os.rename(root / folder_name(iteration), doomed)
        fsync_path(root)
        shutil.rmtree(doomed)
    return removed


def verify(folder: Path, names: Iterable[str] | None = None) -> list[Problem]:
    """What is wrong with a published folder, checked against its manifest: `names` (default: every file
    the manifest lists) are re-hashed. Empty when intact."""
    try:
        expected = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        return [Problem(str(folder / MANIFEST), "(checkpoint)", f"unreadable ({type(exc).__name__}); the save that "
                        "wrote this folder did not finish")]
    problems = []
    for name in sorted(expected) if names is None else names:
        path, want = folder / name, expected[name]
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(Problem(str(path), "(checkpoint)", f"missing (the manifest lists {want['size']} bytes)"))
            continue
        if size != want["size"]:
            problems.append(Problem(str(path), "(checkpoint)", f"truncated or overwritten: {size} bytes, the "
                                    f"manifest lists {want['size']}"))
        elif _fsync_and_hash(path)["sha256"] != want["sha256"]:
            problems.append(Problem(str(path), "(checkpoint)", "corrupted: its sha256 differs from the manifest's"))
    return problems


def newest_intact(root: str | Path, candidates: list[int], damage: Callable[[Path], list[Problem]], otherwise: str
                  ) -> tuple[Path, list[str]]:
    """The newest of the `candidates` (iterations, newest first) in which `damage` finds nothing wrong, and a
    warning for each newer one; DpocError naming every damaged file when none is intact. Resume and the
    converter both start from it (resume's `damage` is shared across ranks, the converter's is `verify`)."""
    root = Path(root)
    if not candidates:
        raise DpocError([no_checkpoint(root)])
    warnings, problems = [], []
    for iteration in candidates:
        folder = root / folder_name(iteration)
        bad = list(dict.fromkeys(damage(folder)))
        if not bad:
            return folder, warnings
        problems += bad
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        warnings.append(f"warning: {folder} is damaged and is not loaded: {bad[0]}{more}; trying the previous "
                        "checkpoint")
    raise DpocError([*problems, Problem(str(root), "(checkpoints)", f"none of its {len(candidates)} checkpoints "
                                        "is intact (each damaged file is named above), so nothing was loaded "
                                        f"(valid: restore the files, or {otherwise})")])


def no_checkpoint(root: str | Path) -> Problem:
    return Problem(str(root), TRACKER, "no checkpoint to resume from; valid: DPOC_RESUME=0")


def manifest_files(folder: Path) -> list[str]:
    """The files a folder's manifest lists (empty when it has none: verify() then names the problem)."""
    try:
        return sorted(json.loads((folder / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError):
        return []


def earlier_run(save: str | None, run_dir: str) -> list[Problem]:
    """A fresh start must not overwrite an earlier run's checkpoints or metrics: what it would overwrite."""
    problems = []
    if save is not None:
        found = iterations(save)
        if found or (Path(save) / TRACKER).is_file():
            newest = f"newest: iteration {found[0]}" if found else f"a {TRACKER} without checkpoint folders"
            problems.append(Problem(save, "(checkpoints)", f"holds an earlier run's checkpoints ({newest}); a fresh "
                                    "start would mix them with this run's (valid: resume it with DPOC_RESUME=1 "
                                    "(resume/megatron.args), or move the folder away or pick another "
                                    "checkpoint.save for a new run)"))
    metrics = Path(run_dir) / METRICS
    steps = _count_lines(metrics)
    if steps:
        problems.append(Problem(str(metrics), "(file)", f"holds {steps} steps of an earlier run; a fresh start "
                                "would overwrite them (valid: resume it with DPOC_RESUME=1 when it saved a "
                                "checkpoint, or move the run directory away or pick another run_dir for a new run)"))
    return problems


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0

