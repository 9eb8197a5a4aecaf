"""Every node of the job on this machine: each node script a process of its own, the master on loopback."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass

from dpoc.common.ports import free_port
from dpoc.compiler.resolve.cluster import is_loopback
from dpoc.contract.errors import EXIT_USER_ERROR, DpocError, Problem
from dpoc.launch import tree
from dpoc.launch.job import Job, Report
from dpoc.launch.process import NodeProcess


@dataclass
class Processes:
    """Node scripts running as local processes (themselves, or the ssh clients running them elsewhere)."""

    nodes: list[NodeProcess]
    where: list[str]
    job: Job

    def poll(self) -> list[Report]:
        return [Report(rank, *node.read()) for rank, node in enumerate(self.nodes)]

    def stop(self) -> list[Report]:
        stoppers = [threading.Thread(target=node.stop) for node in self.nodes]
        for s in stoppers:
            s.start()
        for s in stoppers:
            s.join()
        tree.stop(self.job.token_prefix, prefix=True)  # this launch leaves nothing behind on this machine
        return self.poll()

    def explain(self, report: Report) -> str:
        return exit_reason(report.code)


def exit_reason(code: int | None) -> str:
    if code is not None and code > 128:
        return f"was killed (signal {code - 128}, exit code {code})"
    if code == EXIT_USER_ERROR:
        return f"stopped on an input error (exit code {code})"
    return f"failed with exit code {code}"


def is_this_machine(host: str) -> bool:
    return is_loopback(host) or host in (socket.gethostname(), socket.getfqdn())


class LocalExecutor:
    """`dpoc launch BUILD`: every node script here (as launch.sh does for local hosts), master 127.0.0.1 on a
    port free at each attempt."""

    def start(self, job: Job, attempt: int) -> Processes:
        elsewhere = [h for h in job.hosts if not is_this_machine(h)]
        if elsewhere:
            raise DpocError([Problem(str(job.build / "plan.json"), "cluster.hosts", f"{', '.join(elsewhere)} "
                                     "not this machine; valid: dpoc launch BUILD --ssh (each node on its host), or "
                                     "--ray")])
        master = ("127.0.0.1", free_port())
        nodes = [local_node(job, k, attempt, master) for k in range(job.nodes)]
        return Processes(nodes, ["this machine"] * job.nodes, job)


def local_node(job: Job, rank: int, attempt: int, master: tuple[str, int] | None = None) -> NodeProcess:
    """Node `rank`'s script as a process on this machine, in the job's working directory."""
    env = {**os.environ, **job.node_env(rank, attempt, master)}
    return NodeProcess(["bash", str(job.node_script(rank))], env, str(job.workdir), job.token(rank, attempt))
