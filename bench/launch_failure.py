"""Benchmark the launcher's failure path: the time from a node's death to `dpoc launch` exiting non-zero with
every node stopped, for the local executor (node 1's processes killed with SIGKILL) and on Ray (node 1's
simulated node removed from a `ray.cluster_utils.Cluster`, all on 127.0.0.1).

    python bench/launch_failure.py [--runs 3] [--smoke] [--out FILE]

Each run trains the tiny recipe as 2 nodes × 1 process, waits for the first training step, kills node 1,
and times until the launcher exits; it also checks that no process of the job is left. Prints a table and
writes bench/results/launch_failure.json (`--smoke`: one run per executor, no result unless `--out`).
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._shared import arguments, write_result  # noqa: E402
from dpoc.compiler.pipeline import build  # noqa: E402
from dpoc.launch import tree  # noqa: E402

ENV = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
       "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
       "RAY_USAGE_STATS_ENABLED": "0"}


# the code this benchmark measures: its results' provenance (bench/_shared.provenance)
MEASURES = ("bench/launch_failure.py", "dpoc/launch", "dpoc/cli")


def preprocess(tmp: Path) -> str:
    out = tmp / "pre"
    build(REPO / "recipes/tiny_cpu.yaml", [f"dataset.output_prefix={tmp}/orca_tiny"], out=out)
    subprocess.run(["bash", str(out / "preprocess.sh")], cwd=REPO, env=ENV, check=True, capture_output=True)
    return str(tmp / "orca_tiny")


def node_pids(prefix: str, rank: int) -> list[int]:
    """The processes of node `rank` of the launch whose tokens start with `prefix`."""
    out = []
    for pid in tree.marked(prefix, prefix=True):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(f"{tree.TOKEN_VARIABLE}={prefix}".encode()) and e.endswith(f"-n{rank}".encode())
               for e in environ):
            out.append(pid)
    return out


def one_run(tmp: Path, data: str, where: list[str], kill) -> dict:
    out, run = tmp / "build", tmp / "run"
    build(REPO / "recipes/tiny_cpu.yaml", ["hardware.nodes=2", "hardware.devices_per_node=1",
                                           "training.train_iters=100000", f"dataset.output_prefix={data}",
                                           f"run_dir={run}"], out=out)
    import hashlib

    prefix = f"dpoc-{hashlib.sha256((out / 'plan.json').read_bytes()).hexdigest()[:12]}-"
    err = tmp / "launch.err"
    with err.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "dpoc", "launch", str(out), *where], cwd=REPO, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=sink)
    deadline = time.monotonic() + 600
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"launch ended or stalled before training: {err.read_text()[-2000:]}")
        time.sleep(0.1)
    killed = time.monotonic()
    kill(prefix, err)
    code = proc.wait(timeout=300)
    seconds = time.monotonic() - killed
    time.sleep(1.0)
    return {"seconds": seconds, "exit_code": code, "left_running": len(tree.marked(prefix, prefix=True))}


def local_runs(tmp: Path, data: str, runs: int) -> list[dict]:
    def kill(prefix: str, err: Path) -> None:
        for pid in node_pids(prefix, 1):
            os.kill(pid, signal.SIGKILL)

    return [one_run(tmp / f"local{i}", data, [], kill) for i in range(runs)]


def ray_runs(tmp: Path, data: str, runs: int) -> list[dict]:
    import re

    os.environ.update(ENV)
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False})
    worker = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    try:
        for _ in range(2):
            cluster.add_node(**worker)

        def kill(prefix: str, err: Path) -> None:
            victim = re.findall(r"1: 127\.0\.0\.1 \(Ray node ([0-9a-f]{8})\)", err.read_text())[0]
            (node,) = [n for n in cluster.worker_nodes if n.node_id.startswith(victim)]
            cluster.remove_node(node)

        results = []
        for i in range(runs):
            results.append(one_run(tmp / f"ray{i}", data, ["--ray", cluster.address], kill))
            cluster.add_node(**worker)
        return results
    finally:
        cluster.shutdown()


def main() -> int:
    parser = arguments(__doc__.splitlines()[0], "launch_failure")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = 1 if args.smoke else args.runs
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        data = preprocess(tmp)
        rows = {"local": local_runs(tmp, data, runs), "ray": ray_runs(tmp, data, runs)}
    print(f"{'executor':<9} {'runs':>4} {'death -> exit, s (each)':<28} {'median':>7} {'exit codes':<12} left running")
    for name, results in rows.items():
        each = ", ".join(f"{r['seconds']:.2f}" for r in results)
        print(f"{name:<9} {len(results):>4} {each:<28} {statistics.median(r['seconds'] for r in results):>7.2f} "
              f"{','.join(str(r['exit_code']) for r in results):<12} {sum(r['left_running'] for r in results)}")
    write_result(args, "launch_failure", {"cpu_count": os.cpu_count(), "host": socket.gethostname(), "runs": rows,
                                          "load_average_1min_at_end": os.getloadavg()[0],
                                          "note": "a shared 2-core machine: rough figures"}, MEASURES)
    ok = all(r["exit_code"] != 0 and r["left_running"] == 0 for results in rows.values() for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
