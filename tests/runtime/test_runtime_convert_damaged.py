"""`dpoc convert mcore-to-hf SAVE_DIR` picks the checkpoint as resume does: a damaged newest one is named and
skipped for the newest intact one; with none intact it exits 2 naming every damaged file, never a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dpoc.runtime.checkpoint import publish
from tests.conftest import run_subprocess
from tests.runtime.hf_models import converted_qwen2
from tests.runtime.test_runtime_convert import tensors


def published_save(hf: Path, root: Path, mcore: Path | None = None) -> Path:
    """A save directory of two published checkpoints (iterations 2 and 4, each with its manifest), both the
    converted weights of the HF directory `hf` (`mcore`: that conversion, when already made)."""
    if mcore is None:
        mcore = root.parent / f"{root.name}-mcore"
        done = run_subprocess("convert", "hf-to-mcore", hf, mcore)
        assert done.returncode == 0, done.stderr[-3000:]
    root.mkdir()
    for iteration in (2, 4):
        staging = publish.staging_folder(root, iteration, "t")
        shutil.copytree(mcore, staging)
        publish.publish(staging, publish.file_records(staging, publish.files_of(staging)), root, iteration)
    return root


@pytest.fixture(scope="module")
def save(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("damaged")
    hf, mcore = converted_qwen2()
    shutil.copytree(hf, tmp / "hf")  # the test compares the output with save.parent / "hf"
    return published_save(tmp / "hf", tmp / "save", mcore)


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_and_none_intact_is_exit_2(save):
    shard = max((save / "iter_0000004").glob("*.distcp"), key=lambda p: p.stat().st_size)
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:100])
    out = save.parent / "out"
    done = run_subprocess("convert", "mcore-to-hf", save, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (f"warning: {save}/iter_0000004 is damaged and is not loaded: {shard}: (checkpoint): truncated or "
            f"overwritten: 100 bytes, the manifest lists {size}; trying the previous checkpoint") in done.stderr
    assert {k: v.tolist() for k, v in tensors(out).items()} == \
        {k: v.tolist() for k, v in tensors(save.parent / "hf").items()}

    older = save / "iter_0000002/common.pt"
    older.write_bytes(older.read_bytes()[:-1] + bytes([older.read_bytes()[-1] ^ 1]))
    done = run_subprocess("convert", "mcore-to-hf", save, save.parent / "out2")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-3:] == [
        f"{shard}: (checkpoint): truncated or overwritten: 100 bytes, the manifest lists {size}",
        f"{older}: (checkpoint): corrupted: its sha256 differs from the manifest's",
        f"{save}: (checkpoints): none of its 2 checkpoints is intact (each damaged file is named above), so nothing "
        "was loaded (valid: restore the files, or convert another save directory)"]
    assert "Traceback" not in done.stderr and not (save.parent / "out2").exists()
