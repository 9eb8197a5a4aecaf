"""An input error inside training (here: no intact checkpoint to resume) is exit 2 end to end: every rank stops,
the message is printed once, and the node script, launch.sh and `dpoc launch` all exit 2 and say it is an input
error, although torchrun reports each failed worker as exit 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpoc.compiler.pipeline import build
from dpoc.contract.runs import MANIFEST, TRACKER
from tests.conftest import NO_DEVICE_CHECK, RECIPES, REPO, script_env, tiny_dataset
from tests.launch.helpers import left_running


@pytest.fixture
def damaged(tmp_path) -> tuple[Path, Path, str]:
    """The tiny job (2 processes) whose save directory holds one checkpoint, missing a file its manifest lists."""
    save = tmp_path / "save"
    folder = save / "iter_0000002"
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(json.dumps({"iteration": 2, "files": {"0_0.distcp": {"size": 10, "sha256": "0"}}}))
    (save / TRACKER).write_text("2\n")
    out = tmp_path / "b"
    build(RECIPES / "tiny_cpu.yaml", [f"dataset.output_prefix={tiny_dataset()}", f"checkpoint.save={save}",
                                      f"run_dir={tmp_path}/run"], out=out)
    line = (f"{save}: (checkpoints): none of its 1 checkpoints is intact (each damaged file is named above), so "
            "nothing was loaded (valid: restore the files, or move the save and run directories away and start "
            "afresh with DPOC_RESUME=0)")
    return out, tmp_path / "run", line


@pytest.mark.slow
def test_launch_sh_passes_exit_2_through_with_the_message_once(damaged):
    out, run, line = damaged
    done = subprocess.run(["bash", str(out / "launch.sh")], cwd=REPO,
                          env=script_env(TMPDIR=str(run.parent), **NO_DEVICE_CHECK),
                          capture_output=True, text=True, timeout=300)
    text = done.stdout + done.stderr
    assert done.returncode == 2, text[-3000:]
    assert text.count(line) == 1
    assert not run.exists() and not list(run.parent.glob("*input-error*"))  # nothing written, nothing left
    assert "[dpoc] node 0/1: input error (exit 2): the lines above say what to fix; a restart cannot" in text
    assert "launch.sh: input error (exit 2): a node stopped on a problem with the build or its inputs" in text
    assert "a node failed" not in text
    assert left_running(out) == []


@pytest.mark.slow
def test_dpoc_launch_says_input_error_and_does_not_restart(damaged):
    out, _, line = damaged
    done = subprocess.run([sys.executable, "-m", "dpoc", "launch", str(out), "--max-restarts", "2"], cwd=REPO,
                          env=script_env(**NO_DEVICE_CHECK), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stdout.count(line) == 1
    assert "dpoc launch: b: 1 node (0: this machine), plan " in done.stderr
    assert "dpoc launch: node 0 (this machine) stopped on an input error (exit code 2) after " in done.stderr
    assert "not restarting: exit 2 is a problem with the build or its inputs" in done.stderr
