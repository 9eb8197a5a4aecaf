"""A node's process tree, found by the token its processes carry, and stopped whole.

Process groups are not enough: torchrun starts every worker in a session of its own, so after a `kill -9` of
torchrun its workers are orphans in other groups. Every process a node script starts inherits
`DPOC_NODE_TOKEN` in its environment, which survives reparenting and new sessions; this module finds the
processes whose initial environment holds it (Linux `/proc`) and stops them: SIGTERM, then SIGKILL after a
grace period. The node script calls it when it ends (`python -m dpoc.launch.tree TOKEN`), and the launchers
call it when a node script itself was killed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

TOKEN_VARIABLE = "DPOC_NODE_TOKEN"
DEFAULT_GRACE_S = 5.0


def marked(token: str, prefix: bool = False) -> list[int]:
    """Processes whose environment holds `DPOC_NODE_TOKEN=<token>` (or a token starting with it), except this
    process and its ancestors: the node script that calls this carries the token too."""
    entry = f"{TOKEN_VARIABLE}={token}".encode()
    spared = _self_and_ancestors()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in spared:
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        if any(e == entry or (prefix and e.startswith(entry)) for e in environ):
            found.append(int(proc.name))
    return found


def stop(token: str, grace_s: float = DEFAULT_GRACE_S, prefix: bool = False) -> list[int]:
    """SIGTERM every marked process, SIGKILL those still there after `grace_s`; returns the pids signalled."""
    signalled = pids = marked(token, prefix)
    _signal(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = marked(token, prefix)
    _signal(pids, signal.SIGKILL)
    return signalled


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(pid, sig)


def _self_and_ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the parenthesised command name
    return pids


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpoc.launch.tree", description="stop every process of a node")
    parser.add_argument("token", help="the node's DPOC_NODE_TOKEN")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, help="seconds between SIGTERM and SIGKILL")
    args = parser.parse_args(argv)
    if args.token:
        stop(args.token, args.grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
