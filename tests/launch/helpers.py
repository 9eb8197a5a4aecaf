"""What the launcher tests share: the tiny dataset preprocessed once, the environment node scripts run in, the
processes a launch left behind, and stand-ins for torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path

from dpoc.compile import build
from dpoc.launch import tree
from tests.conftest import RECIPES, REPO

_TEMP = tempfile.TemporaryDirectory(prefix="dpoc-launch-tests-")  # removed when the test session ends


def launch_env(**extra: str) -> dict[str, str]:
    """Node scripts find this checkout's dpoc and the venv's python/torchrun; one thread per gloo process."""
    return {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
            "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}


@cache
def tiny_dataset() -> str:
    """The tiny recipe's data, preprocessed once per session by its rendered preprocess.sh; the output prefix."""
    tmp = Path(_TEMP.name) / "data"
    out = tmp / "build"
    build(RECIPES / "tiny_cpu.yaml", [f"dataset.output_prefix={tmp}/orca_tiny"], out=out)
    pre = subprocess.run(["bash", str(out / "preprocess.sh")], cwd=REPO, env=launch_env(), capture_output=True,
                         text=True, timeout=300)
    assert pre.returncode == 0, pre.stderr[-2000:]
    assert json.loads((tmp / "orca_tiny_stats.json").read_text())["pairs_kept"] == 256
    return str(tmp / "orca_tiny")


def scratch(name: str) -> Path:
    """A directory that lives as long as the session (for what cached helpers build)."""
    path = Path(_TEMP.name) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def plan_hash(build_dir: Path) -> str:
    import hashlib

    return hashlib.sha256((build_dir / "plan.json").read_bytes()).hexdigest()


def left_running(build_dir: Path, wait_s: float = 15.0) -> list[int]:
    """Processes of any launch of this build still alive after up to `wait_s` (every launcher token starts with
    `dpoc-<plan hash[:12]>-`)."""
    prefix = f"dpoc-{plan_hash(build_dir)[:12]}-"
    deadline = time.monotonic() + wait_s
    while (pids := tree.marked(prefix, prefix=True)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return pids


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss, the last record of each step (a resumed run may repeat steps)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]
    return out


STUB_TORCHRUN = r"""#!/usr/bin/env bash
# torchrun stand-in: records each start, starts a "worker" in a session of its own (as torchrun does), then
# behaves as $STUB_PLAN says for this node and attempt: "RANK:ATTEMPT=CODE ..." exits CODE, else it waits
# for its worker (which only a stop ends).
rank=0; master=""
while [ $# -gt 0 ]; do
  case "$1" in --node_rank) rank=$2 ;; --master_addr) master=$2 ;; --master_port) master="$master:$2" ;; esac
  shift
done
count_file="$STUB_DIR/node$rank.count"; attempt=$(( $(cat "$count_file" 2>/dev/null || echo 0) + 1 ))
echo "$attempt" > "$count_file"
echo "node=$rank attempt=$attempt resume=${DPOC_RESUME:-unset} master=$master" >> "$STUB_DIR/starts.log"
setsid sleep 300 &
echo "stub: node $rank attempt $attempt started"
for rule in ${STUB_PLAN:-}; do
  if [ "${rule%%=*}" = "$rank:$attempt" ]; then echo "stub: node $rank attempt $attempt exits ${rule#*=}"; exit "${rule#*=}"; fi
done
wait
"""


def stub_torchrun(directory: Path) -> Path:
    """A bin directory holding the torchrun stand-in (put it first on PATH); its records go to `directory`."""
    bin_dir = directory / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "torchrun").write_text(STUB_TORCHRUN)
    (bin_dir / "torchrun").chmod(0o755)
    return bin_dir
