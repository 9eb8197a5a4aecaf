"""`dpoc launch BUILD --ray` on Ray's own multi-node simulation (`ray.cluster_utils.Cluster`, every process on
127.0.0.1): the tiny recipe as 2 nodes × 1 process trains like 1 node × 2 processes; a node removed mid-run stops
the job with nothing left running; a restarted job resumes; a node's preflight failure reaches the driver; a
submitted launch is followed and stopped through Ray Jobs. One cluster for the module: a head without CPUs
(nothing of the job lands there) and three 1-CPU workers (two for the job, one spare for a restart)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from dpoc.common.ports import free_port
from dpoc.compiler.pipeline import build
from dpoc.contract.runs import TRACKER
from tests.conftest import NO_DEVICE_CHECK, RECIPES, REPO, scratch, script_env, tiny_dataset
from tests.launch.helpers import left_running, losses, plan_hash

ray_cluster_utils = pytest.importorskip("ray.cluster_utils")

ITERS, SAVE = 10, 2
# loopback only, offline; no node runs the device check (tests/runtime/test_device_check.py tests it)
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", **NO_DEVICE_CHECK}
WORKER = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}


@dataclass
class RayCluster:
    cluster: object
    address: str
    dashboard: str

    def remove(self, node_id_prefix: str) -> None:
        """Remove the worker node whose id starts with the prefix (as if its machine died)."""
        (node,) = [n for n in self.cluster.worker_nodes if n.node_id.startswith(node_id_prefix)]
        self.cluster.remove_node(node)

    def replace_removed(self) -> None:
        while len(self.cluster.worker_nodes) < 3:
            self.cluster.add_node(**WORKER)


@pytest.fixture(scope="module")
def ray_cluster():
    env = script_env(**RAY_ENV)
    env.pop("RAY_ADDRESS", None)
    with pytest.MonkeyPatch.context() as mp:  # the cluster's processes (and the actors) inherit this environment
        for key, value in env.items():
            mp.setenv(key, value)
        dashboard_port = free_port()
        cluster = ray_cluster_utils.Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port})
        try:
            for _ in range(3):
                cluster.add_node(**WORKER)
            yield RayCluster(cluster, cluster.address, f"http://127.0.0.1:{dashboard_port}")
        finally:
            cluster.shutdown()


def _build(tmp_path: Path, *overrides: str) -> tuple[Path, Path]:
    out, run = tmp_path / "build", tmp_path / "run"
    build(RECIPES / "tiny_cpu.yaml", ["hardware.nodes=2", "hardware.devices_per_node=1", f"training.train_iters={ITERS}",
                                      f"training.save_interval={SAVE}", f"dataset.output_prefix={tiny_dataset()}",
                                      f"run_dir={run}", *overrides], out=out)
    return out, run


def _dpoc(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpoc", *args], cwd=REPO, env=script_env(**RAY_ENV),
                          capture_output=True, text=True, timeout=timeout)


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """`dpoc launch ARGS` in the background; its stderr goes to a file the test reads while it runs."""
    err = tmp_path / "launch.err"
    with (tmp_path / "launch.out").open("w") as out, err.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "dpoc", "launch", *args], cwd=REPO, env=script_env(**RAY_ENV),
                                stdout=out, stderr=sink)
    return proc, err


def _wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        assert proc is None or proc.poll() is None, f"the launch ended (exit {proc.returncode}) before {what}"
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout:g} s")


def _ray_nodes(stderr: str) -> list[str]:
    """The Ray node of each job node, from the launcher's first line."""
    return re.findall(r"\d: 127\.0\.0\.1 \(Ray node ([0-9a-f]{8})\)", stderr)


@cache
def reference_losses() -> dict[int, float]:
    """The tiny job as 1 node × 2 processes through `dpoc launch` on this machine: the losses every layout must
    give; it saves every SAVE steps, so it must leave the tracker file behind."""
    tmp = scratch("ray-reference")
    out, run = _build(tmp, "hardware.nodes=1", "hardware.devices_per_node=2")
    result = _dpoc("launch", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "checkpoints" / TRACKER).is_file()
    return losses(run)


@pytest.mark.slow
def test_two_ray_nodes_train_like_one_node_with_two_processes(ray_cluster, tmp_path):
    out, run = _build(tmp_path)
    result = _dpoc("launch", str(out), "--ray", ray_cluster.address)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = _ray_nodes(result.stderr)
    assert first != second  # STRICT_SPREAD: one bundle per Ray node
    assert re.search(r"^\[node 1\] \[dpoc\] node 1/2: fresh run, master 127\.0\.0\.1:\d+$", result.stdout, re.M)
    assert "[node 0] step 10/10 |" in result.stdout
    log = (run / "launch/node-1.log").read_text()
    assert log.startswith(f"=== dpoc launch: attempt 1 of 1, node 1 on 127.0.0.1 (Ray node {second}) ===\n")
    reference = reference_losses()
    assert sorted(losses(run)) == list(range(1, ITERS + 1))
    assert losses(run) == pytest.approx(reference, rel=1e-5)


@pytest.mark.slow
def test_a_node_removed_mid_run_stops_the_job_with_nothing_left(ray_cluster, tmp_path):
    out, run = _build(tmp_path, "training.train_iters=100000")
    proc, err = _start(tmp_path, str(out), "--ray", ray_cluster.address)
    try:
        _wait_for(lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text(), 300,
                  "training step", proc)
        victim = _ray_nodes(err.read_text())[1]
        removed = time.monotonic()
        ray_cluster.remove(victim)
        code = proc.wait(timeout=120)
        print(f"node removed -> dpoc launch exited: {time.monotonic() - removed:.1f} s")
    finally:
        proc.kill()
        ray_cluster.replace_removed()
    stderr = err.read_text()
    assert code == 1, stderr[-3000:]
    assert (f"dpoc launch: node 1 (127.0.0.1 (Ray node {victim})) is gone (its Ray actor died: the node left the "
            "cluster, or the actor's process was killed) after ") in stderr
    assert left_running(out) == []


@pytest.mark.slow
def test_a_node_failing_its_preflight_fails_the_job_with_its_message(ray_cluster, tmp_path):
    out, _ = _build(tmp_path, f"dataset.output_prefix={tmp_path}/missing/orca")
    result = _dpoc("launch", str(out), "--ray", ray_cluster.address, "--max-restarts", "2")
    assert result.returncode == 2
    assert re.search(r"dpoc launch: node \d \(127\.0\.0\.1 \(Ray node [0-9a-f]{8}\)\) stopped on an input error "
                     r"\(exit code 2\)", result.stderr)
    assert (f"] {tmp_path}/missing/orca_packed_chosen_input_ids_document.bin: (file): missing preprocessed dataset (8 "
            f"of 8 files absent); run bash {out}/preprocess.sh first\n") in result.stderr
    assert "not restarting" in result.stderr and left_running(out) == []


@pytest.mark.slow
def test_a_restarted_job_resumes_and_finishes_with_the_uninterrupted_losses(ray_cluster, tmp_path):
    out, run = _build(tmp_path, "launch.max_restarts=1")
    proc, err = _start(tmp_path, str(out), "--ray", ray_cluster.address)
    try:
        _wait_for(lambda: (run / "checkpoints" / TRACKER).is_file(), 300, "checkpoint", proc)
        ray_cluster.remove(_ray_nodes(err.read_text())[1])  # the spare worker takes its place on the restart
        code = proc.wait(timeout=600)
    finally:
        proc.kill()
        ray_cluster.replace_removed()
    stderr = err.read_text()
    assert code == 0, stderr[-3000:]
    assert "dpoc launch: restart 1 of 1: every node runs again and resumes from the last complete checkpoint " \
           "(iteration " in stderr
    assert "resume run" in (run / "launch/node-0.log").read_text()
    resumed, reference = losses(run), reference_losses()
    assert max(resumed) == ITERS  # every step the run recorded (before and after the restart) is the reference's
    assert resumed == pytest.approx({step: reference[step] for step in resumed}, rel=1e-5)
    assert left_running(out) == []


@pytest.mark.slow
def test_a_submitted_launch_is_followed_and_stopped_through_ray_jobs(ray_cluster, tmp_path):
    out, _ = _build(tmp_path, "training.train_iters=100000")
    address = ray_cluster.dashboard
    submitted = _dpoc("launch", str(out), "--ray", address, "--submit", timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    sid = submitted.stdout.strip()
    assert sid == f"dpoc-build-{plan_hash(out)[:12]}"  # the run's name (the build directory's) and the Plan hash
    _wait_for(lambda: "[node 1] [dpoc] node 1/2: fresh run" in _dpoc("jobs", "logs", sid, "--address", address).stdout,
              300, "node 1 running in the job's logs")
    assert _dpoc("jobs", "status", sid, "--address", address).stdout == f"{sid}: RUNNING (Job is currently running.)\n"
    again = _dpoc("launch", str(out), "--ray", address, "--submit")
    assert again.returncode == 2
    assert again.stderr == (f"dpoc launch: --submit: this build is already on Ray as {sid} (RUNNING); valid: dpoc "
                            f"jobs stop {sid}, then submit again\n")
    stopped = _dpoc("jobs", "stop", sid, "--address", address)
    assert stopped.stdout == f"{sid}: STOPPED\n", stopped.stderr
    assert left_running(out, wait_s=30) == []
    followed = _dpoc("jobs", "logs", sid, "--address", address, "--follow", timeout=60)  # ends with the job
    assert "[node 0] [dpoc] node 0/2: fresh run" in followed.stdout
    unknown = _dpoc("jobs", "status", "dpoc-nope", "--address", address)
    assert unknown.returncode == 2
    assert unknown.stderr == "dpoc jobs: dpoc-nope: no such Ray job on this cluster; valid: the id dpoc launch " \
                             "--submit printed\n"


@pytest.mark.slow
def test_launch_without_a_ray_cluster_says_how_to_start_one(tmp_path):
    out, _ = _build(tmp_path)
    result = _dpoc("launch", str(out), "--ray", f"127.0.0.1:{free_port()}", timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("dpoc launch: --ray: no Ray cluster at 127.0.0.1:")
    assert result.stderr.endswith("valid: start one with BUILD/ray-head.sh (and BUILD/ray-worker.sh HEAD on the "
                                  "other nodes), or give --ray ADDRESS\n")

