"""One node script (or the ssh client running it remotely) as a process: its output, its exit, its stop.

The same class serves every executor: `dpoc launch` runs it for each local or ssh node, and the Ray actor of a
node runs it on that node. The process gets a session of its own (stopping it signals its whole group, never
the launcher), dies with its parent (Linux: a parent-death signal, so a killed launcher or Ray actor does not
leave a node running), and its output is read line by line on a thread. Stopping sends SIGTERM to the script
(its trap then stops every process carrying its token), waits, SIGKILLs what is left in its group, and sweeps
the token once more.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

from dpoc.launch import tree

EXIT_WAIT_S = 2.0  # after the process exits, how long its output may still drain (from processes it left)


def _die_with_parent():
    """preexec_fn: SIGTERM to the child when the thread that started it ends (prctl resolved before forking)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.restype = ctypes.c_int
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


class NodeProcess:
    """A node script running as `argv`; `token` marks every process it starts (see `tree`)."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], cwd: str, token: str,
                 remote_stop: Sequence[str] | None = None):
        self.token, self._remote_stop = token, list(remote_stop) if remote_stop else None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            with self._lock:
                self._lines.append(raw.decode(errors="replace").rstrip("\n"))

    def read(self) -> tuple[list[str], int | None]:
        """The output lines since the last read, and the exit code once the script has ended (a signal N is
        reported as 128 + N, as a shell does)."""
        code = self._proc.poll()
        if code is not None:
            self._reader.join(EXIT_WAIT_S)
        with self._lock:
            lines, self._lines = self._lines, []
        return lines, None if code is None else (128 - code if code < 0 else code)

    def stop(self, grace_s: float = tree.DEFAULT_GRACE_S) -> None:
        """Stop the node's whole process tree: its trap first, then by force; bounded by about 2 × grace_s."""
        ended_well = self._proc.poll() == 0  # the script, remote or not, ran its own trap
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)  # to the script alone: its trap decides how its processes end
            try:
                self._proc.wait(grace_s + 1.0)  # the trap's own SIGTERM-to-SIGKILL grace, and a margin
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self._proc.wait()
        self._signal_group(signal.SIGKILL)  # anything left in its group (a trap that never ran)
        if self._remote_stop and not ended_well:
            with contextlib.suppress(subprocess.SubprocessError, OSError):  # the host may be the one that is gone
                subprocess.run(self._remote_stop, stdin=subprocess.DEVNULL, capture_output=True, timeout=grace_s + 20)
        elif not self._remote_stop:
            tree.stop(self.token, grace_s)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)
