"""The save directory's files: atomic publishing, manifests checked file by file, pruning, leftovers of a
killed save, and the fresh-start rule. Plain files, no torch."""

from __future__ import annotations

import json

import pytest

from dpoc.contract.runs import MANIFEST, METRICS, TRACKER
from dpoc.runtime.checkpoint import publish


def _staged(root, iteration: int, token: str = "1"):
    staging = publish.staging_folder(root, iteration, token)
    (staging / "sub").mkdir(parents=True)
    (staging / "common.pt").write_bytes(b"common" * 100)
    (staging / "sub" / "__0_0.distcp").write_bytes(bytes(range(256)) * 8)
    return staging


def _save(root, iteration: int):
    staging = _staged(root, iteration)
    records = publish.file_records(staging, publish.files_of(staging))
    return publish.publish(staging, records, root, iteration)


def test_a_published_folder_has_its_manifest_and_the_tracker_names_it(tmp_path):
    final = _save(tmp_path, 4)
    assert final == tmp_path / "iter_0000004" and not list(tmp_path.glob("*.tmp-*"))
    assert (tmp_path / TRACKER).read_text() == "4\n"
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest["iteration"] == 4
    assert manifest["files"]["common.pt"]["size"] == 600
    assert sorted(manifest["files"]) == ["common.pt", "sub/__0_0.distcp"]
    assert publish.verify(final) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary tracker left


def test_damage_is_named_file_by_file(tmp_path):
    final = _save(tmp_path, 2)
    shard = final / "sub" / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[:1000])
    assert [str(p) for p in publish.verify(final)] == [
        f"{shard}: (checkpoint): truncated or overwritten: 1000 bytes, the manifest lists 2048"]
    shard.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])  # same size, one byte flipped
    assert [str(p) for p in publish.verify(final)] == [
        f"{shard}: (checkpoint): corrupted: its sha256 differs from the manifest's"]
    shard.unlink()
    assert [str(p) for p in publish.verify(final)] == [
        f"{shard}: (checkpoint): missing (the manifest lists 2048 bytes)"]
    assert publish.verify(final, ["common.pt"]) == []  # a rank checks only its share
    (final / MANIFEST).unlink()
    assert [str(p) for p in publish.verify(final)] == [
        f"{final / MANIFEST}: (checkpoint): unreadable (FileNotFoundError); the save that wrote this folder "
        "did not finish"]


def test_ranks_share_the_hashing():
    names = [f"f{i}" for i in range(7)]
    shares = [publish.share(names, rank, 3) for rank in range(3)]
    assert sorted(n for s in shares for n in s) == names and [len(s) for s in shares] == [3, 2, 2]


def test_a_replayed_save_replaces_the_folder_of_its_iteration(tmp_path):
    _save(tmp_path, 2)
    (tmp_path / "iter_0000002" / "stale").write_text("from the first save")
    _save(tmp_path, 2)
    assert not (tmp_path / "iter_0000002" / "stale").exists()
    assert publish.verify(tmp_path / "iter_0000002") == [] and not list(tmp_path.glob("*.tmp-*"))


def test_pruning_keeps_the_newest(tmp_path):
    for iteration in (2, 4, 6, 8):
        _save(tmp_path, iteration)
    assert publish.prune(tmp_path, keep=2) == [4, 2]
    assert publish.iterations(tmp_path) == [8, 6]
    assert publish.prune(tmp_path, keep=2) == [] and not list(tmp_path.glob("*.tmp-*"))


def test_leftovers_of_a_killed_save_are_ignored_then_removed(tmp_path):
    _save(tmp_path, 2)
    leftover = _staged(tmp_path, 4, token="999")
    assert publish.iterations(tmp_path) == [2]
    assert publish.remove_staging(tmp_path) == [leftover]
    assert not leftover.exists() and publish.iterations(tmp_path) == [2]


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_a_fresh_start_may_use_an_empty_run(tmp_path, content):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / METRICS).write_text(content)
    assert publish.earlier_run(str(tmp_path / "save"), str(tmp_path / "run")) == []


def test_a_fresh_start_refuses_to_overwrite_an_earlier_run(tmp_path):
    save, run = tmp_path / "save", tmp_path / "run"
    _save(save, 6)
    run.mkdir()
    (run / METRICS).write_text('{"step": 1}\n{"step": 2}\n')
    assert [str(p) for p in publish.earlier_run(str(save), str(run))] == [
        f"{save}: (checkpoints): holds an earlier run's checkpoints (newest: iteration 6); a fresh start would mix "
        "them with this run's (valid: resume it with DPOC_RESUME=1 (resume/megatron.args), or move the folder away "
        "or pick another checkpoint.save for a new run)",
        f"{run}/metrics.jsonl: (file): holds 2 steps of an earlier run; a fresh start would overwrite them (valid: "
        "resume it with DPOC_RESUME=1 when it saved a checkpoint, or move the run directory away or pick another "
        "run_dir for a new run)"]
