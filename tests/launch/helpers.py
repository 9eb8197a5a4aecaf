"""What the launcher tests share: the processes a launch left behind, losses of a run, a torchrun stand-in."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from dpoc.launch import tree


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
# for its worker (which only a stop ends). With STUB_NODES=N a node about to exit first waits (at most 60 s)
# until N nodes have started this attempt, so a test can rely on every node having started before one fails.
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
  if [ "${rule%%=*}" = "$rank:$attempt" ]; then
    for _ in $(seq 600); do [ "$(grep -c " attempt=$attempt " "$STUB_DIR/starts.log")" -ge "${STUB_NODES:-0}" ] && break; sleep 0.1; done
    echo "stub: node $rank attempt $attempt exits ${rule#*=}"; exit "${rule#*=}"; fi
done
wait
"""


def stub_torchrun(directory: Path) -> Path:
    """A bin directory holding the torchrun stand-in (put it first on PATH); its records go to `directory`."""
    bin_dir = directory / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "torchrun").write_text(STUB_TORCHRUN)
    (bin_dir / "torchrun").chmod(0o755)
    route_torchrun(bin_dir, sys.executable)
    return bin_dir


def route_torchrun(bin_dir: Path, python: str) -> None:
    """A `python` in `bin_dir` that hands the node scripts' `python -m dpoc.runtime.torchrun ...` to bin_dir's
    torchrun stand-in and runs everything else with `python`."""
    (bin_dir / "python").write_text(
        f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = dpoc.runtime.torchrun ]; then shift 2; exec "{bin_dir}/torchrun" '
        f'"$@"; fi\nexec "{python}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
