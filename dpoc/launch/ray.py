"""Each node of the job as a Ray actor: one placement group, one bundle per node, STRICT_SPREAD.

Bundle k holds node k's devices as Ray resources (`NPU` on Ascend, `GPU` on cuda, `CPU` on cpu); the actor in
it runs node k's script there (`NodeProcess`: preflight, then torchrun), so the node rank is the bundle index
and never derived from addresses (simulated nodes share one). The master is bundle 0's node address with a
port found free on that node, handed to every node script as DPOC_MASTER_ADDR/DPOC_MASTER_PORT. A node whose
actor dies (its node left the cluster) or stops answering counts as failed. Ray is imported only here.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any

from dpoc.common.ports import free_port
from dpoc.compiler.resolve.cluster import RAY_RESOURCE, ray_bundle
from dpoc.contract.errors import EXIT_USER_ERROR, DpocError, Problem
from dpoc.launch import tree
from dpoc.launch.job import Job, Report
from dpoc.launch.local import exit_reason
from dpoc.launch.process import NodeProcess

PLACEMENT_TIMEOUT_S = 120.0
POLL_TIMEOUT_S = 30.0  # an actor that does not answer a poll for this long counts as gone
CONNECT_TIMEOUT_S = 10.0


def import_ray():
    try:
        import ray
    except ImportError:
        raise DpocError([Problem("dpoc launch", "--ray", "Ray is not installed here; valid: pip install "
                                 "'dpoc[ray]' (on every node, in the job's environment)")]) from None
    return ray


class NodeHost:
    """Node k's actor, in bundle k: starts the node script on its Ray node and reports on it."""

    def __init__(self) -> None:
        self._node: NodeProcess | None = None

    def address(self) -> tuple[str, int, str]:
        """This node's address, a port free on it now, and its Ray node id."""
        import ray

        return ray.util.get_node_ip_address(), free_port(), ray.get_runtime_context().get_node_id()

    def start(self, script: str, env: dict[str, str], cwd: str, token: str) -> str | None:
        """Start the node script; a reason when it cannot be (the build or working directory is not here)."""
        if not os.path.isdir(cwd):
            return f"working directory {cwd} does not exist on this node (paths must be identical on every node)"
        if not os.path.isfile(script):
            return (f"{script} not found on this node: put the build at the same path on every node (or on a shared "
                    "filesystem)")
        self._node = NodeProcess(["bash", script], {**os.environ, **env}, cwd, token)
        return None

    def read(self) -> tuple[list[str], int | None]:
        return self._node.read() if self._node is not None else ([], None)  # not started: its master was lost

    def stop(self, grace_s: float) -> tuple[list[str], int | None]:
        """Stop the node's processes; what it printed since the last read, and its exit code."""
        if self._node is not None:
            self._node.stop(grace_s)
        return self.read()


def _actor_options(bundle: dict[str, float]) -> dict[str, Any]:
    """The actor takes its whole bundle, so Ray sets the device visibility (ASCEND_RT_/CUDA_VISIBLE_DEVICES)."""
    (resource, amount), = bundle.items()
    if resource == RAY_RESOURCE["cpu"]:
        return {"num_cpus": amount}
    if resource == RAY_RESOURCE["cuda"]:
        return {"num_cpus": 0, "num_gpus": amount}
    return {"num_cpus": 0, "resources": {resource: amount}}


@dataclass
class RayNodes:
    """The actors of one attempt and their placement group."""

    ray: Any
    actors: list[Any]
    group: Any
    where: list[str]
    start_errors: dict[int, str]  # nodes whose script could not start, and why

    def __post_init__(self) -> None:
        self.gone: dict[int, str] = {}
        self._told: set[int] = set()

    def poll(self) -> list[Report]:
        ray = self.ray
        done = set(self.gone) | set(self.start_errors)
        live = {k: a.read.remote() for k, a in enumerate(self.actors) if k not in done}
        ready = set(ray.wait(list(live.values()), num_returns=len(live), timeout=POLL_TIMEOUT_S)[0]) if live else set()
        reports = []
        for k in range(len(self.actors)):
            if k in self.start_errors:
                reports.append(Report(k, [] if k in self._told else [self.start_errors[k]], EXIT_USER_ERROR))
                self._told.add(k)
                continue
            if k in live and live[k] not in ready:
                self.gone[k] = f"did not answer for {POLL_TIMEOUT_S:g} s"
            elif k in live:
                try:
                    reports.append(Report(k, *ray.get(live[k])))
                    continue
                except ray.exceptions.RayActorError:
                    self.gone[k] = "its Ray actor died: the node left the cluster, or the actor's process was killed"
            reports.append(Report(k, [], None, gone=self.gone[k]))
        return reports

    def stop(self) -> list[Report]:
        ray = self.ray
        alive = [k for k in range(len(self.actors)) if k not in self.gone]
        last = _each(ray, [self.actors[k].stop.remote(tree.DEFAULT_GRACE_S) for k in alive],
                     timeout=3 * tree.DEFAULT_GRACE_S + 10)
        for actor in self.actors:  # its node script, were it still running, would get its parent-death SIGTERM
            with contextlib.suppress(ray.exceptions.RayError):
                ray.kill(actor)
        with contextlib.suppress(ray.exceptions.RayError):
            ray.util.remove_placement_group(self.group)
        return [Report(k, *result) for k, result in zip(alive, last, strict=True) if not isinstance(result, Exception)]

    def explain(self, report: Report) -> str:
        return f"is gone ({report.gone})" if report.gone else exit_reason(report.code)


def _unreachable(address: str) -> str | None:
    """Why the cluster's address does not answer, if it does not: ray.init would retry a dead address for many
    minutes, silently. `auto` is resolved as Ray does (RAY_ADDRESS, else this machine's latest cluster)."""
    import socket

    try:
        from ray._private.services import canonicalize_bootstrap_address

        resolved = canonicalize_bootstrap_address(address.split("://", 1)[-1])
    except (ImportError, ValueError, ConnectionError) as exc:
        return str(exc)
    if resolved is None:
        return "no cluster found on this machine"
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _each(ray: Any, refs: list[Any], timeout: float = POLL_TIMEOUT_S) -> list[Any]:
    """Each call's result, or the error of an actor that died (the others' results still count)."""
    out = []
    deadline = time.monotonic() + timeout
    for ref in refs:  # the calls run concurrently: one deadline for all
        try:
            out.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            out.append(exc)
    return out


class RayExecutor:
    """`dpoc launch BUILD --ray [ADDRESS]`: the job's nodes on an existing Ray cluster (ADDRESS, else
    RAY_ADDRESS, else the cluster this machine belongs to). Never starts a Ray instance of its own."""

    def __init__(self, address: str | None):
        self.ray = ray = import_ray()
        target = address or os.environ.get("RAY_ADDRESS") or "auto"
        unreachable = _unreachable(target)
        if unreachable is None:
            try:
                ray.init(address=target, log_to_driver=False, logging_level="warning")
                return
            except ConnectionError as exc:
                unreachable = str(exc)
        raise DpocError([Problem("dpoc launch", "--ray", f"no Ray cluster at {target} ({unreachable}); valid: start "
                                 "one with BUILD/ray-head.sh (and BUILD/ray-worker.sh HEAD on the other nodes), or "
                                 "give --ray ADDRESS")])

    def start(self, job: Job, attempt: int) -> RayNodes:
        ray = self.ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = ray_bundle(job.device, job.devices_per_node)
        group = ray.util.placement_group([bundle] * job.nodes, strategy="STRICT_SPREAD")
        try:
            ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(group)
            raise DpocError([Problem(str(job.build / "plan.json"), "hardware.nodes", f"the Ray cluster cannot place "
                                     f"{job.nodes} nodes of {bundle} each on different Ray nodes (STRICT_SPREAD) "
                                     f"within {PLACEMENT_TIMEOUT_S:g} s; valid: add nodes (BUILD/ray-worker.sh), "
                                     "or see what is free with `ray status`")]) from None
        host, options = ray.remote(NodeHost), _actor_options(bundle)
        actors = [host.options(**options, scheduling_strategy=PlacementGroupSchedulingStrategy(group, k)).remote()
                  for k in range(job.nodes)]
        addresses = _each(ray, [a.address.remote() for a in actors])
        where = ["a lost Ray node" if isinstance(a, Exception) else f"{a[0]} (Ray node {a[2][:8]})" for a in addresses]
        nodes = RayNodes(ray, actors, group, where, {})
        lost = [k for k, a in enumerate(addresses) if isinstance(a, Exception)]
        if not lost:  # every node script gets the master: bundle 0's address and a port free there
            master = addresses[0][:2]
            calls = [a.start.remote(str(job.node_script(k)), job.node_env(k, attempt, master), str(job.workdir),
                                    job.token(k, attempt)) for k, a in enumerate(actors)]
            started = _each(ray, calls)
            lost = [k for k, e in enumerate(started) if isinstance(e, Exception)]
            nodes.start_errors.update({k: e for k, e in enumerate(started) if isinstance(e, str)})
        nodes.gone.update({k: "its Ray actor died before its script started" for k in lost})
        return nodes

    def close(self) -> None:
        self.ray.shutdown()
