"""What every executor shares: the job read from the build, supervising its nodes, stopping them all when one
fails, and restarting the whole job when restarts are allowed.

An executor (`local`, `ssh`, `ray`) only starts the nodes of one attempt somewhere and returns a `Running`:
their reports (output lines, exit code, or that the node is gone) and a stop that ends every node's process
tree. `launch` does the rest, identically for all three: it streams the lines to the driver prefixed
`[node k]` and into `<run_dir>/launch/node-<k>.log`, stops every node as soon as one fails, names it with its
last lines, and restarts up to `max_restarts` times. A restart runs every node script again; they resume from
the last complete checkpoint by themselves (`DPOC_RESUME=auto`: the save directory's tracker file).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from dpoc.compiler.render import targets
from dpoc.contract.errors import EXIT_USER_ERROR, DpocError, Problem, counted
from dpoc.contract.runs import TRACKER
from dpoc.launch.first_error import first_error

POLL_S = 0.2
TAIL_LINES = 20
SCANNED_LINES = 2000  # of a node's output, searched for its first error when it fails


@dataclass(frozen=True)
class Job:
    """The build as the launcher sees it: only rendered files (plan.json) are read."""

    build: Path  # absolute: the same path on every node
    workdir: Path  # where node scripts run; relative paths in the build are relative to it
    name: str
    plan_hash: str
    runtime: str
    nodes: int
    hosts: tuple[str, ...]
    device: str
    devices_per_node: int
    run_dir: str
    save: str
    max_restarts: int
    launch_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @classmethod
    def from_build(cls, build_dir: str | Path, workdir: str | Path | None = None) -> Job:
        import hashlib

        build = Path(build_dir).absolute()
        try:
            text = (build / "plan.json").read_bytes()
        except OSError:
            raise DpocError([Problem(str(build), "plan.json", "not a dpoc build directory (no plan.json); make one "
                                     "with dpoc build RECIPE")]) from None
        plan = json.loads(text)
        try:
            hw = plan["hardware"]
            return cls(build=build, workdir=Path(workdir or os.getcwd()).absolute(), name=plan["name"],
                       plan_hash=hashlib.sha256(text).hexdigest(), runtime=plan["runtime"], nodes=hw["nodes"],
                       hosts=tuple(plan["cluster"]["hosts"]), device=hw["device"],
                       devices_per_node=hw["devices_per_node"], run_dir=plan["run_dir"],
                       save=plan["checkpoint"]["save"], max_restarts=plan["launch"]["max_restarts"])
        except KeyError as exc:
            raise DpocError([Problem(str(build / "plan.json"), str(exc.args[0]), f"missing: built by dpoc "
                                     f"{plan.get('dpoc_version', '?')}, older than this launcher; rebuild it with "
                                     "dpoc build")]) from None

    def node_script(self, rank: int) -> Path:
        return self.build / targets.get(self.runtime).node_script(rank)

    def token(self, rank: int, attempt: int) -> str:
        """What every process of node `rank` carries in this attempt; `token_prefix` covers the whole launch."""
        return f"{self.token_prefix}a{attempt}-n{rank}"

    @property
    def token_prefix(self) -> str:
        return f"dpoc-{self.plan_hash[:12]}-{self.launch_id}-"

    def node_env(self, rank: int, attempt: int, master: tuple[str, int] | None = None) -> dict[str, str]:
        """What a node script gets from its launcher: its token, the Plan hash it must hold, the master (when the
        launcher chooses it), and on a restart DPOC_RESUME=auto, so it resumes from the last checkpoint."""
        env = {"DPOC_NODE_TOKEN": self.token(rank, attempt), "DPOC_PLAN_HASH": self.plan_hash}
        if master is not None:
            env.update(DPOC_MASTER_ADDR=master[0], DPOC_MASTER_PORT=str(master[1]))
        if attempt > 0:
            env["DPOC_RESUME"] = "auto"
        return env

    def checkpoint(self) -> str | None:
        """The iteration of the last complete checkpoint, when the save directory is visible from here."""
        tracker = self.workdir / self.save / TRACKER
        try:
            return tracker.read_text().strip()
        except OSError:
            return None


@dataclass(frozen=True)
class Report:
    """One node's news since the last poll."""

    rank: int
    lines: list[str]
    code: int | None  # the node script's exit code once it has ended
    gone: str | None = None  # the node (or its Ray actor) disappeared, and why


class Running(Protocol):
    """The nodes of one attempt, wherever they run."""

    where: list[str]  # per node, for people: a host, an address, a Ray node

    def poll(self) -> list[Report]: ...

    def stop(self) -> list[Report]: ...  # every node's process tree, in bounded time; their last lines

    def explain(self, report: Report) -> str: ...  # what a failure means on this executor


class Executor(Protocol):
    def start(self, job: Job, attempt: int) -> Running: ...


@dataclass
class Failure:
    rank: int
    code: int  # what `dpoc launch` exits with
    why: str
    tail: list[str]
    error: str | None = None  # the first failing rank's exception line (first_error), when there is one


class NodeLogs:
    """Every node's lines, on the driver (prefixed `[node k]`) and in `<run_dir>/launch/node-<k>.log`."""

    def __init__(self, job: Job, out: IO[str]):
        self.dir = job.workdir / job.run_dir / "launch"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.files = [open(self.dir / f"node-{k}.log", "w") for k in range(job.nodes)]  # noqa: SIM115
        self.tails = [deque(maxlen=SCANNED_LINES) for _ in range(job.nodes)]

    def attempt(self, attempt: int, restarts: int, where: list[str]) -> None:
        for k, f in enumerate(self.files):
            f.write(f"=== dpoc launch: attempt {attempt + 1} of {restarts + 1}, node {k} on {where[k]} ===\n")
            f.flush()
            self.tails[k].clear()

    def write(self, rank: int, lines: list[str]) -> None:
        if not lines:
            return
        f = self.files[rank]
        for line in lines:
            f.write(line + "\n")
            self.out.write(f"[node {rank}] {line}\n")
        f.flush()
        self.out.flush()
        self.tails[rank].extend(lines)

    def close(self) -> None:
        for f in self.files:
            f.close()


def supervise(running: Running, logs: NodeLogs) -> Failure | None:
    """Wait for every node to end; the first that fails (or disappears) stops all of them. However it ends
    (success, a failure, Ctrl-C, SIGTERM from `dpoc jobs stop`, a bug), every node's processes are stopped."""
    first = None
    try:
        while first is None:
            reports = running.poll()
            for r in reports:
                logs.write(r.rank, r.lines)
            failed = [r for r in reports if r.gone or r.code not in (None, 0)]
            if failed:
                first = min(failed, key=lambda r: (r.gone is None, r.rank))  # a vanished node is the likelier cause
            elif all(r.code == 0 for r in reports):
                break
            else:
                time.sleep(POLL_S)
    finally:
        for r in running.stop():  # and what the nodes printed on their way out
            logs.write(r.rank, r.lines)
    if first is None:
        return None
    code = first.code if first.code not in (None, 0) else 1
    seen = list(logs.tails[first.rank])
    return Failure(first.rank, code, running.explain(first), seen[-TAIL_LINES:], first_error(seen))


def launch(executor: Executor, job: Job, max_restarts: int | None = None, err: IO[str] = sys.stderr,
           out: IO[str] = sys.stdout) -> int:
    """Run the job to its end; the exit code: 0, the failed node's, 2 for a preflight (input) failure."""
    restarts = job.max_restarts if max_restarts is None else max_restarts
    logs = NodeLogs(job, out)
    attempt = 0
    try:
        while True:
            started = time.monotonic()
            running = executor.start(job, attempt)
            logs.attempt(attempt, restarts, running.where)
            where = ", ".join(f"{k}: {w}" for k, w in enumerate(running.where))
            say(err, f"{job.name}: {counted(job.nodes, 'node')} ({where}), plan {job.plan_hash[:12]}, logs in "
                     f"{logs.dir}")
            failure = supervise(running, logs)
            if failure is None:
                say(err, f"{job.name}: every node finished ({time.monotonic() - started:.1f} s)")
                return 0
            log = logs.dir / f"node-{failure.rank}.log"
            said = f"its first error (the whole output: {log}):" if failure.error else f"its last lines ({log}):"
            say(err, f"node {failure.rank} ({running.where[failure.rank]}) {failure.why} after "
                     f"{time.monotonic() - started:.1f} s; every node is stopped; {said}")
            for line in [failure.error] if failure.error else failure.tail:
                err.write(f"  [node {failure.rank}] {line}\n")
            if failure.code == EXIT_USER_ERROR:
                say(err, "not restarting: exit 2 is a problem with the build or its inputs (above), which a "
                         "restart cannot fix")
                return failure.code
            if attempt == restarts:
                if restarts:
                    say(err, f"giving up after {counted(restarts, 'restart')} (max_restarts)")
                return failure.code
            attempt += 1
            checkpoint = job.checkpoint()
            resume = (f"iteration {checkpoint} in {job.save}" if checkpoint else
                      f"none visible here in {job.save}: each node resumes if its save directory holds one")
            say(err, f"restart {attempt} of {restarts}: every node runs again and resumes from the last complete "
                     f"checkpoint ({resume})")
    finally:
        logs.close()


def say(err: IO[str], message: str) -> None:
    err.write(f"dpoc launch: {message}\n")
    err.flush()
