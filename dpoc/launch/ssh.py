"""Each node of the job on its host over ssh (the recipe's hardware.hosts), in the same working directory.

ssh runs with BatchMode (no prompt: key-based login or an immediate failure), a connect timeout and keep-alives
(`dpoc.compiler.resolve.cluster.SSH_OPTIONS`), so an unreachable or dead host fails its node in seconds, not
never. A remote node is stopped by its token (`python -m dpoc.launch.tree TOKEN` over ssh): killing the local ssh
client alone would leave the remote processes running. Hosts that are this machine run locally.
"""

from __future__ import annotations

import os
import shlex

from dpoc.compiler.resolve.cluster import SSH_CONNECT_TIMEOUT_S, SSH_OPTIONS
from dpoc.contract.errors import DpocError, Problem
from dpoc.launch.job import Job, Report
from dpoc.launch.local import Processes, exit_reason, is_this_machine, local_node
from dpoc.launch.process import NodeProcess

SSH_FAILED = 255  # ssh's own exit code: the connection failed or broke


class SshProcesses(Processes):
    def explain(self, report: Report) -> str:
        if report.code == SSH_FAILED and not is_this_machine(self.job.hosts[report.rank]):
            return (f"lost its ssh connection (exit {SSH_FAILED}: unreachable within {SSH_CONNECT_TIMEOUT_S} s, no "
                    "key-based login, or the host stopped answering)")
        return exit_reason(report.code)


class SshExecutor:
    """`dpoc launch BUILD --ssh`: node k on hardware.hosts[k]; the master is the build's (node 0's address)."""

    def start(self, job: Job, attempt: int) -> SshProcesses:
        if not job.hosts:
            raise DpocError([Problem(str(job.build / "plan.json"), "cluster.hosts", "this build has no hosts to ssh "
                                     "to; valid: dpoc launch BUILD --ray [ADDRESS] (Ray places the nodes), or rebuild "
                                     "with hardware.hosts or hardware.hostfile")])
        nodes = [local_node(job, k, attempt) if is_this_machine(host) else _remote_node(job, k, attempt, host)
                 for k, host in enumerate(job.hosts)]
        return SshProcesses(nodes, list(job.hosts), job)


def _remote_node(job: Job, rank: int, attempt: int, host: str) -> NodeProcess:
    """ssh running node `rank`'s script on `host`, its launcher's variables set in the remote command."""
    env, token = job.node_env(rank, attempt), job.token(rank, attempt)
    assignments = " ".join(f"{key}={shlex.quote(value)}" for key, value in sorted(env.items()))
    remote = f"cd {shlex.quote(str(job.workdir))} && {assignments} bash {shlex.quote(str(job.node_script(rank)))}"
    stop = f"python -m dpoc.launch.tree {shlex.quote(token)}"
    return NodeProcess(["ssh", *SSH_OPTIONS, host, remote], dict(os.environ), str(job.workdir), token,
                       remote_stop=["ssh", *SSH_OPTIONS, host, stop])
