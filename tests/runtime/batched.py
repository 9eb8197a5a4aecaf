"""Runtime runs declared up front and launched together: every pending run of one process count goes into one
launch of `batch_driver.py` (one python, or one torchrun group), in the order declared, when a test first asks
for one of them. Each run still gets its own process group, environment and exit code, and its own stdout and
stderr (the ranks' concatenated, as torchrun passes them through), so the tests assert on the same things they
would for `python -m dpoc.runtime.train @file`; they name their failures as before, one test per run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from dpoc.common.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("batch_driver.py")
SECONDS_PER_RUN = 600  # what a launch of one run had; a launch gets this per run it holds (a bound for hangs)


@dataclass
class _Run:
    name: str
    module: str
    argv: list[str]
    processes: int
    group: str


def launcher(processes: int) -> list[str]:
    """`python`, or torchrun on 127.0.0.1 (gloo) for several processes."""
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}"]


def environment() -> dict[str, str]:
    """This checkout's dpoc, one thread per gloo process, no library warnings."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}


class Runs:
    """The runs of one test module (or fixture), under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self._pending: dict[str, _Run] = {}
        self._done: dict[str, subprocess.CompletedProcess] = {}
        self._launches = 0

    def add(self, name: str, module_argv: list[str], processes: int = 1, group: str = "") -> None:
        """Declare a run: `module_argv` is what follows `python` (`["-m", "dpoc.runtime.train", "@x.args"]`);
        runs of another `group` never share a launch (what one leaves in its process, e.g. a device stand-in)."""
        assert module_argv[0] == "-m" and name not in self._pending and name not in self._done, name
        self._pending[name] = _Run(name, module_argv[1], [str(a) for a in module_argv[2:]], processes, group)

    def result(self, name: str) -> subprocess.CompletedProcess:
        """The run's exit code and output, launching it (with every run pending at its process count and group)
        if needed."""
        if name not in self._done:
            self.launch(self._pending[name].processes, self._pending[name].group)
        return self._done[name]

    def launch(self, processes: int, group: str = "") -> None:
        runs = [r for r in self._pending.values() if (r.processes, r.group) == (processes, group)]
        if not runs:
            return
        self._launches += 1
        folder = self.root / f"launch-{self._launches}"
        plan = [{"module": r.module, "argv": r.argv, "out": str(folder / r.name)} for r in runs]
        folder.mkdir(parents=True)
        (folder / "plan.json").write_text(json.dumps(plan))
        done = subprocess.run([*launcher(processes), str(DRIVER), str(folder / "plan.json")], cwd=ROOT,
                              env=environment(), capture_output=True, text=True,
                              timeout=SECONDS_PER_RUN * len(runs))
        for run in runs:
            del self._pending[run.name]
            self._done[run.name] = _collect(folder / run.name, processes, done)


def _collect(out: Path, processes: int, launch: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """One run's result: its ranks' output concatenated; its code the first non-zero rank's (torchrun's is 1 for
    any failed worker; the tests ask only for 0, 2 or not 0). A run the launch never finished gets the launch's
    own code and output after its own, so its test shows why."""
    codes, stdout, stderr = [], [], []
    for rank in range(processes):
        rc = out / f"rank{rank}.rc"
        codes.append(int(rc.read_text()) if rc.exists() else None)
        for name, into in (("stdout", stdout), ("stderr", stderr)):
            path = out / f"rank{rank}.{name}"
            into.append(path.read_text(errors="replace") if path.exists() else "")
    if None in codes:
        stderr.append(f"\n(batch launch ended before this run finished: exit {launch.returncode})\n"
                      f"{launch.stdout[-2000:]}{launch.stderr[-4000:]}")
        code = launch.returncode or 1
    else:
        code = next((c for c in codes if c), 0)
    return subprocess.CompletedProcess(["batch", str(out)], code, "".join(stdout), "".join(stderr))
