"""Where a build runs: a multi-node recipe without hosts builds (the launcher supplies the master), a loopback
master for remote nodes is refused, and the launch settings are part of the Plan."""

from __future__ import annotations

import json
import os
import subprocess

from dpoc.compiler.pipeline import build
from tests.compiler.test_build import stub_tools
from tests.conftest import RECIPES

HOSTLESS = ["hardware.nodes=2", "hardware.devices_per_node=1"]


def test_a_multi_node_recipe_without_hosts_builds_and_takes_the_master_from_the_launcher(tmp_path):
    out = tmp_path / "build"
    build(RECIPES / "tiny_cpu.yaml", HOSTLESS, out=out)
    cluster = json.loads((out / "plan.json").read_text())["cluster"]
    assert cluster == {"hosts": [], "master_addr": None, "master_port": None}
    assert sorted(p.name for p in (out / "nodes").iterdir()) == ["node-0.sh", "node-1.sh"]
    env, log = stub_tools(tmp_path)
    missing = subprocess.run(["bash", str(out / "nodes/node-1.sh")], cwd=tmp_path, env=env, capture_output=True,
                             text=True)
    assert missing.returncode == 2 and not log.exists()
    assert missing.stderr == ("node 1: no master: this build has no hardware.hosts, so DPOC_MASTER_ADDR and "
                              "DPOC_MASTER_PORT must name node 0's address and a free port there; dpoc launch BUILD "
                              "--ray sets them (or rebuild with hardware.hosts)\n")
    env.update(DPOC_MASTER_ADDR="10.1.2.3", DPOC_MASTER_PORT="29400")
    subprocess.run(["bash", str(out / "nodes/node-1.sh")], cwd=tmp_path, env=env, check=True, capture_output=True)
    torchrun = [ln for ln in log.read_text().splitlines() if ln.startswith("--nnodes")]
    assert torchrun == [f"--nnodes 2 --node_rank 1 --nproc_per_node 1 --master_addr 10.1.2.3 --master_port 29400 "
                        f"-m dpoc.runtime.train @{out}/megatron.args"]


def test_the_guide_without_its_host_list_builds_for_the_launcher(tmp_path):
    """The README's multi-node flow: the 2-node guide recipe with its hosts deleted."""
    out = tmp_path / "q"
    build(RECIPES / "qwen3_30b.yaml", ["~hardware.hosts"], out=out)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["hardware"]["nodes"] == 2 and plan["cluster"] == {"hosts": [], "master_addr": None,
                                                                   "master_port": None}
    assert "DPOC_MASTER_ADDR and DPOC_MASTER_PORT" in (out / "mindspeed-rl/nodes/node-1.sh").read_text()


def test_launch_sh_without_hosts_says_to_use_ray_or_give_hosts(tmp_path):
    out = tmp_path / "build"
    build(RECIPES / "tiny_cpu.yaml", HOSTLESS, out=out)
    run = subprocess.run(["bash", str(out / "launch.sh")], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr == (f"this build has no hardware.hosts: start it with dpoc launch {out} --ray [ADDRESS] (Ray "
                          "places the nodes and supplies the master), or rebuild it with hardware.hosts or "
                          "hardware.hostfile\n")


def test_a_loopback_master_for_remote_nodes_is_refused(dpoc_cli, tmp_path):
    recipe = RECIPES / "qwen3_30b.yaml"
    listed = dpoc_cli("build", recipe, "hardware.hosts=[127.0.0.1,10.0.0.2]", "-o", tmp_path / "a")
    assert listed.code == 2
    assert listed.err == (f"{recipe}: hardware.hosts: the master 127.0.0.1 is a loopback address, but 10.0.0.2 reads "
                          "it as itself, so no other node would reach node 0; valid: node 0's network address (first "
                          "in hardware.hosts), or no hosts and dpoc launch --ray\n")
    named = dpoc_cli("build", recipe, "hardware.master_addr=localhost", "-o", tmp_path / "b")
    assert named.code == 2 and named.err.startswith(f"{recipe}: hardware.master_addr: the master localhost is a "
                                                    "loopback address, but 192.168.1.10 reads it as itself")
    local = dpoc_cli("build", RECIPES / "tiny_cpu.yaml", "hardware.hosts=[127.0.0.1,localhost]", "-o", tmp_path / "c")
    assert local.code == 0, local.err  # every node on this machine: loopback is right


def test_max_restarts_is_a_launch_setting_with_its_source(dpoc_cli):
    default = dpoc_cli("explain", RECIPES / "tiny_cpu.yaml")
    rows = {ln.split()[0]: ln for ln in default.out.splitlines()}
    assert rows["launch.max_restarts"].split()[1:3] == ["0", "default"]
    assert "a failed node fails the job: no restarts" in rows["launch.max_restarts"]
    rows = {ln.split()[0]: ln for ln in dpoc_cli("explain", RECIPES / "tiny_cpu.yaml",
                                                 "launch.max_restarts=3").out.splitlines()}
    assert rows["launch.max_restarts"].split()[1:3] == ["3", "user:command"]
    bad = dpoc_cli("validate", RECIPES / "tiny_cpu.yaml", "--set", "launch.max_restarts=-1")
    assert bad.code == 2 and "launch.max_restarts: must be >= 0 (got -1)" in bad.err


RECORD_ARGV = '#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$ARGV_LOG"\n'


def _ray_start(script, tmp_path, *args, **env):
    """Run a rendered ray-*.sh with a `ray` stand-in; its argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "ray").write_text(RECORD_ARGV)
    (bin_dir / "ray").chmod(0o755)
    log = tmp_path / "argv"
    full = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ARGV_LOG": str(log), **env}
    run = subprocess.run(["bash", str(script), *args], env=full, capture_output=True, text=True)
    return run, log.read_text().splitlines() if log.exists() else []


def test_ray_scripts_offer_exactly_the_bundle_a_node_of_the_job_asks_for(tmp_path):
    from dpoc.compiler.resolve.cluster import ray_bundle

    for recipe, overrides, resources, bundle in (
        ("qwen3_30b.yaml", [], ["--resources", '{"NPU": 16}'], {"NPU": 16.0}),
        ("tiny_cpu.yaml", HOSTLESS, ["--num-cpus", "1"], {"CPU": 1.0}),
        ("tiny_cpu.yaml", [*HOSTLESS, "hardware.device=cuda", "hardware.backend=nccl", "hardware.devices_per_node=2"],
         ["--num-gpus", "2"], {"GPU": 2.0}),
    ):
        out = tmp_path / recipe / str(len(overrides))
        build(RECIPES / recipe, overrides, out=out)
        plan = json.loads((out / "plan.json").read_text())
        assert ray_bundle(plan["hardware"]["device"], plan["hardware"]["devices_per_node"]) == bundle
        run, head = _ray_start(out / "ray-head.sh", tmp_path, RAY_PORT="7000", RAY_NODE_IP="10.0.0.5")
        assert run.returncode == 0, run.stderr
        assert head == ["start", "--head", "--port", "7000", "--dashboard-host", "127.0.0.1", "--node-ip-address",
                        "10.0.0.5", *resources]
        run, worker = _ray_start(out / "ray-worker.sh", tmp_path, "10.0.0.5:7000", "--block")
        assert worker == ["start", "--address", "10.0.0.5:7000", *resources, "--block"]
    run, _ = _ray_start(out / "ray-worker.sh", tmp_path)
    assert run.returncode != 0 and "usage: ray-worker.sh HEAD_ADDRESS:PORT (printed by ray-head.sh)" in run.stderr


def test_launchers_start_the_recipes_runtime_target(tmp_path):
    """A runtime: mindspeed-rl build launches MindSpeed-RL's node scripts (launch.sh and dpoc launch alike)."""
    from dpoc.launch.job import Job

    for runtime, script in (("dpoc", "nodes/node-1.sh"), ("mindspeed-rl", "mindspeed-rl/nodes/node-1.sh")):
        out = tmp_path / runtime
        build(RECIPES / "qwen3_30b.yaml", [f"runtime={runtime}"], out=out)
        assert f"start_node 1 192.168.1.11 {script}\n" in (out / "launch.sh").read_text()
        assert Job.from_build(out).node_script(1) == out / script
