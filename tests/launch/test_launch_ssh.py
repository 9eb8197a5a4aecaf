"""`dpoc launch BUILD --ssh` and launch.sh over ssh, with an `ssh` stand-in that records its arguments and runs
the remote command here: ssh's options (batch mode, timeouts), the quoting of the remote command, a remote node
stopped by its token, an unreachable host, and a build without hosts."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dpoc.compiler.pipeline import build
from tests.compiler.test_preflight import touch_dataset
from tests.conftest import RECIPES, script_env
from tests.launch.helpers import left_running, plan_hash, route_torchrun, stub_torchrun

OPTIONS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15", "-o",
           "ServerAliveCountMax=4"]
FAKE_SSH = """#!/usr/bin/env bash
# ssh stand-in: records its arguments (one per line, then ---) and runs the remote command on this machine
{ for a in "$@"; do printf '%s\\n' "$a"; done; echo ---; } >> "$STUB_DIR/ssh.log"
while [ "$1" = -o ]; do shift 2; done
host=$1
if [ "$host" = "${UNREACHABLE:-}" ]; then echo "ssh: connect to host $host port 22: Connection timed out" >&2; exit 255; fi
exec bash -c "$2"
"""
# `python -m dpoc preflight` passes without looking (node-a does not resolve here); everything else is python
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1 $2 $3" = "-m dpoc preflight" ]; then exit 0; fi
exec {python} "$@"
"""


@pytest.fixture
def job_dir(tmp_path):
    """A working directory whose name needs quoting, the job's inputs, and the ssh/python/torchrun stand-ins."""
    work = tmp_path / "work dir" / "it's"
    touch_dataset(str(work / "data/orca_tiny"))
    os.makedirs(work / "assets/tiny/tokenizer")
    bin_dir = stub_torchrun(work)
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "no-preflight-python").write_text(FAKE_PYTHON.format(python=shlex.quote(sys.executable)))
    for tool in ("ssh", "no-preflight-python"):
        (bin_dir / tool).chmod(0o755)
    route_torchrun(bin_dir, str(bin_dir / "no-preflight-python"))
    return work


def _build(job_dir: Path, *overrides: str) -> Path:
    out = job_dir / "build"
    build(RECIPES / "tiny_cpu.yaml", ["hardware.devices_per_node=1", f"dataset.output_prefix={job_dir}/data/orca_tiny",
                                      f"run_dir={job_dir}/run", *overrides], out=out)
    return out


def _run(job_dir: Path, command: list[str], **env: str) -> subprocess.CompletedProcess:
    full = script_env(STUB_DIR=str(job_dir), STUB_PLAN="1:1=4", STUB_NODES="2", **env)
    full["PATH"] = f"{job_dir / 'bin'}:{full['PATH']}"
    return subprocess.run(command, cwd=job_dir, env=full, capture_output=True, text=True, timeout=300)


def _ssh_calls(job_dir: Path) -> list[list[str]]:
    text = (job_dir / "ssh.log").read_text()
    return [call.strip("\n").split("\n") for call in text.split("---\n") if call.strip()]


def test_each_node_runs_over_ssh_and_a_failure_stops_the_others_by_token(job_dir):
    out = _build(job_dir, "hardware.hosts=[node-a,node-b]")
    run = _run(job_dir, [sys.executable, "-m", "dpoc", "launch", str(out), "--ssh"])
    assert run.returncode == 4, run.stderr
    assert "dpoc launch: node 1 (node-b) failed with exit code 4 after " in run.stderr
    assert "  [node 1] stub: node 1 attempt 1 exits 4\n" in run.stderr
    calls = _ssh_calls(job_dir)
    starts = {c[8]: c for c in calls if "bash" in c[9]}
    assert sorted(starts) == ["node-a", "node-b"] and all(c[:8] == OPTIONS for c in calls)
    token_b = f"dpoc-{plan_hash(out)[:12]}-"
    remote = starts["node-b"][9]
    assert remote.startswith(f"cd {shlex.quote(str(job_dir))} && DPOC_NODE_TOKEN={token_b}")
    assert remote.endswith(f"-a0-n1 DPOC_PLAN_HASH={plan_hash(out)} bash {shlex.quote(str(out / 'nodes/node-1.sh'))}")
    # the remote command ran where it said (the quoted working directory), and node 0 was stopped by its token
    assert sorted(ln.split(" resume")[0] for ln in (job_dir / "starts.log").read_text().splitlines()) == [
        "node=0 attempt=1", "node=1 attempt=1"]
    token_a = starts["node-a"][9].split("DPOC_NODE_TOKEN=")[1].split()[0]
    assert [*OPTIONS, "node-a", f"python -m dpoc.launch.tree {token_a}"] in calls
    assert left_running(out) == []


def test_an_unreachable_host_fails_its_node_at_once(job_dir):
    out = _build(job_dir, "hardware.hosts=[node-a,node-b]")
    run = _run(job_dir, [sys.executable, "-m", "dpoc", "launch", str(out), "--ssh"], UNREACHABLE="node-b")
    assert run.returncode == 255
    assert ("dpoc launch: node 1 (node-b) lost its ssh connection (exit 255: unreachable within 10 s, no key-based "
            "login, or the host stopped answering) after ") in run.stderr
    assert "  [node 1] ssh: connect to host node-b port 22: Connection timed out\n" in run.stderr
    assert left_running(out) == []


def test_launch_sh_uses_batch_mode_and_stops_the_others(job_dir):
    out = _build(job_dir, "hardware.hosts=[node-a,node-b]")
    run = _run(job_dir, ["bash", str(out / "launch.sh")])
    assert run.returncode == 4
    assert "launch.sh: a node failed (exit 4); stopping the others" in run.stderr
    calls = _ssh_calls(job_dir)
    assert all(c[:8] == OPTIONS for c in calls)
    stops = [c[9] for c in calls if c[9].startswith("python -m dpoc.launch.tree ")]
    launcher = stops[0].split("-")[-2]  # launch.sh's pid: its tokens are dpoc-<plan>-<pid>-n<k>
    assert stops == [f"python -m dpoc.launch.tree dpoc-{plan_hash(out)[:12]}-{launcher}-n{k}" for k in (0, 1)]
    assert left_running(out) == []


def test_ssh_without_hosts_says_to_use_ray_or_give_hosts(job_dir):
    out = _build(job_dir, "hardware.nodes=2")
    run = _run(job_dir, [sys.executable, "-m", "dpoc", "launch", str(out), "--ssh"])
    assert run.returncode == 2
    assert run.stderr == (f"{out}/plan.json: cluster.hosts: this build has no hosts to ssh to; valid: dpoc launch "
                          "BUILD --ray [ADDRESS] (Ray places the nodes), or rebuild with hardware.hosts or "
                          "hardware.hostfile\n")
