"""A node script takes its whole process tree down when it ends: `kill -9` of its torchrun leaves no worker
running (torchrun starts each worker in a session of its own, so a process group alone would not reach them)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dpoc.common.ports import free_port
from dpoc.compiler.pipeline import build
from dpoc.launch import tree
from tests.conftest import NO_DEVICE_CHECK, RECIPES, REPO, script_env, tiny_dataset


def _argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:  # gone
        return []


def _is_torchrun(pid: int) -> bool:
    return "dpoc.runtime.torchrun" in _argv(pid)[:3]  # python -m dpoc.runtime.torchrun


@pytest.mark.slow
def test_kill_9_of_torchrun_takes_its_workers_down(tmp_path):
    out = tmp_path / "build"
    build(RECIPES / "tiny_cpu.yaml", ["training.train_iters=100000", f"dataset.output_prefix={tiny_dataset()}",
                                      f"run_dir={tmp_path}/run"], out=out)
    token = f"test-tree-{os.getpid()}-{time.monotonic_ns()}"
    log = tmp_path / "node-0.log"
    with log.open("w") as sink:
        node = subprocess.Popen(["bash", str(out / "nodes/node-0.sh")], cwd=REPO, start_new_session=True,
                                env=script_env(DPOC_NODE_TOKEN=token, DPOC_MASTER_PORT=str(free_port()),
                                               **NO_DEVICE_CHECK),
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        workers: list[int] = []
        while len(workers) < 2 and time.monotonic() < deadline and node.poll() is None:
            time.sleep(0.5)
            workers = [p for p in tree.marked(token) if "dpoc.runtime.train" in _argv(p) and not _is_torchrun(p)]
        assert len(workers) == 2, log.read_text()[-3000:]
        (agent,) = [p for p in tree.marked(token) if _is_torchrun(p)]
        assert all(os.getsid(w) == w for w in workers)  # each worker leads a session of its own
        os.kill(agent, signal.SIGKILL)
        assert node.wait(timeout=60) == 128 + signal.SIGKILL  # the node script reports torchrun's death
        assert [w for w in workers if _argv(w)] == []  # a zombie, briefly, has no command line
        assert tree.marked(token) == []
    finally:
        tree.stop(token, grace_s=0)
        node.kill()
        node.wait()
