"""A build is published durably with one filesystem sync, not an fsync per file (30 fsyncs were most of a
`dpoc build`'s time on ext4), and falls back to fsyncing every file and directory where there is no syncfs."""

from __future__ import annotations

import os
from pathlib import Path

from dpoc.common import atomic
from dpoc.compiler.pipeline import build
from tests.conftest import RECIPES


def _counting(monkeypatch) -> tuple[list[str], list[Path]]:
    fsynced: list[str] = []
    synced: list[Path] = []
    real_fsync, real_syncfs = os.fsync, atomic._syncfs

    def fsync(fd: int) -> None:
        fsynced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def syncfs(path: Path) -> bool:
        synced.append(path)
        return real_syncfs(path)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(atomic, "_syncfs", syncfs)
    return fsynced, synced


def test_a_build_syncs_its_filesystem_once(tmp_path, monkeypatch):
    fsynced, synced = _counting(monkeypatch)
    build(RECIPES / "qwen3_30b.yaml", out=tmp_path / "b")
    assert len(synced) == 1 and synced[0].parent == tmp_path  # the staging directory, before its rename
    assert fsynced == [str(tmp_path)]  # then only the directory entry the rename changed


def test_without_syncfs_every_file_and_folder_is_fsynced(tmp_path, monkeypatch):
    fsynced, _ = _counting(monkeypatch)
    monkeypatch.setattr(atomic, "_syncfs", lambda path: False)
    build(RECIPES / "qwen3_30b.yaml", out=tmp_path / "b")
    staging = fsynced[-2]  # the walk goes bottom-up: the staging root is synced last, before its rename
    staged = {os.path.relpath(p, staging) for p in fsynced[:-1]}
    assert staged == {str(p.relative_to(tmp_path / "b")) for p in (tmp_path / "b").rglob("*")} | {"."}
    assert fsynced[-1] == str(tmp_path)
