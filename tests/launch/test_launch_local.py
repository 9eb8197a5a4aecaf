"""`dpoc launch BUILD` on this machine, and the supervision every executor shares: a failing node stops the
job, restarts up to max_restarts, exit codes, nothing left running. torchrun is a stand-in here (real node
scripts, real preflight); real training through the launcher is in test_launch_ray.py."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from dpoc.compiler.pipeline import build
from dpoc.contract.errors import DpocError
from dpoc.launch.job import Job, launch
from dpoc.launch.local import LocalExecutor
from tests.compiler.test_preflight import touch_dataset
from tests.conftest import NO_DEVICE_CHECK, RECIPES, REPO, script_env
from tests.launch.helpers import left_running, plan_hash, stub_torchrun

TWO_NODES = ["hardware.nodes=2", "hardware.devices_per_node=1"]


@pytest.fixture
def job_dir(tmp_path):
    """A working directory holding the tiny job's inputs (stand-ins: preflight checks presence), and stubs."""
    touch_dataset(str(tmp_path / "data/orca_tiny"))
    os.makedirs(tmp_path / "assets/tiny/tokenizer")
    return tmp_path


def _build(job_dir, *overrides):
    out = job_dir / "build"
    build(RECIPES / "tiny_cpu.yaml", [*TWO_NODES, f"dataset.output_prefix={job_dir}/data/orca_tiny",
                                      f"run_dir={job_dir}/run", *overrides], out=out)
    return out


def _launch(job_dir, out, *args, plan=""):
    env = script_env(STUB_DIR=str(job_dir), STUB_PLAN=plan, STUB_NODES="2", **NO_DEVICE_CHECK)
    env["PATH"] = f"{stub_torchrun(job_dir)}:{env['PATH']}"
    return subprocess.run([sys.executable, "-m", "dpoc", "launch", str(out), *args], cwd=job_dir, env=env,
                          capture_output=True, text=True, timeout=300)


def _starts(job_dir):
    return (job_dir / "starts.log").read_text().splitlines()


@pytest.mark.slow
def test_a_failing_node_restarts_the_whole_job_until_it_succeeds(job_dir):
    out = _build(job_dir, "launch.max_restarts=2")
    run = _launch(job_dir, out, plan="1:1=3 1:2=3 1:3=0 0:3=0")
    assert run.returncode == 0, run.stderr
    starts = sorted(_starts(job_dir))
    master = {line.split("master=")[1] for line in starts}
    assert len(master) == 3 and all(m.startswith("127.0.0.1:") for m in master)  # a free port per attempt
    assert [s.split(" master=")[0] for s in starts] == [
        "node=0 attempt=1 resume=unset", "node=0 attempt=2 resume=auto", "node=0 attempt=3 resume=auto",
        "node=1 attempt=1 resume=unset", "node=1 attempt=2 resume=auto", "node=1 attempt=3 resume=auto"]
    err = run.stderr
    assert "dpoc launch: node 1 (this machine) failed with exit code 3 after " in err
    assert "  [node 1] stub: node 1 attempt 1 exits 3\n" in err
    assert ("dpoc launch: restart 1 of 2: every node runs again and resumes from the last complete checkpoint (none "
            "visible here in ") in err
    assert "dpoc launch: restart 2 of 2:" in err and "every node finished" in err
    assert "[node 0] stub: node 0 attempt 3 exits 0" in run.stdout
    log = (job_dir / "run/launch/node-1.log").read_text()
    assert log.count("=== dpoc launch: attempt ") == 3 and "attempt 3 of 3, node 1 on this machine ===" in log
    assert left_running(out) == []


@pytest.mark.slow
def test_restarts_give_up_after_max_restarts_with_the_nodes_exit_code(job_dir):
    out = _build(job_dir)  # the recipe allows none; the command line allows one
    run = _launch(job_dir, out, "--max-restarts", "1", plan="1:1=3 1:2=3")
    assert run.returncode == 3
    assert sorted(s.split(" resume")[0] for s in _starts(job_dir)) == [
        "node=0 attempt=1", "node=0 attempt=2", "node=1 attempt=1", "node=1 attempt=2"]
    assert run.stderr.count("failed with exit code 3") == 2
    assert run.stderr.endswith("dpoc launch: giving up after 1 restart (max_restarts)\n")
    assert left_running(out) == []  # node 0's worker (its own session) was stopped both times


def test_a_preflight_failure_is_not_restarted(job_dir, tmp_path):
    out = _build(job_dir, "launch.max_restarts=2", f"dataset.output_prefix={tmp_path}/missing/orca")
    run = _launch(job_dir, out)
    assert run.returncode == 2
    assert not (job_dir / "starts.log").exists()
    assert f"missing preprocessed dataset (8 of 8 files absent); run bash {out}/preprocess.sh first" in run.stderr
    assert run.stderr.endswith("dpoc launch: not restarting: exit 2 is a problem with the build or its inputs "
                               "(above), which a restart cannot fix\n")


def test_a_node_holding_another_build_fails_its_preflight(job_dir, monkeypatch):
    """The launcher names the build it started; a node whose build differs is refused by its preflight."""
    launched = _build(job_dir)
    other = job_dir / "other"
    build(RECIPES / "tiny_cpu.yaml", [*TWO_NODES, "training.lr=1e-4", f"dataset.output_prefix={job_dir}/data/orca_tiny",
                                      f"run_dir={job_dir}/run"], out=other)
    monkeypatch.setenv("PATH", script_env()["PATH"])
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    job = replace(Job.from_build(launched, job_dir), build=other)  # as if the nodes held `other` at that path
    err, out = io.StringIO(), io.StringIO()
    assert launch(LocalExecutor(), job, err=err, out=out) == 2
    assert (f"is plan {plan_hash(other)[:12]}, but the launcher started plan {plan_hash(launched)[:12]}: this node "
            "holds another build; fix: copy the launching machine's build directory to this node at the same path"
            ) in out.getvalue()


def test_local_launch_refuses_a_build_for_other_machines(tmp_path):
    out = tmp_path / "b"
    build(RECIPES / "qwen3_30b.yaml", out=out)
    with pytest.raises(DpocError) as exc:
        LocalExecutor().start(Job.from_build(out), 0)
    assert str(exc.value) == (f"{out}/plan.json: cluster.hosts: 192.168.1.10, 192.168.1.11 not this machine; valid: "
                              "dpoc launch BUILD --ssh (each node on its host), or --ray")


def test_launch_needs_a_build_directory(tmp_path, dpoc_cli):
    result = dpoc_cli("launch", tmp_path)
    assert result.code == 2
    assert result.err == f"{tmp_path}: plan.json: not a dpoc build directory (no plan.json); make one with dpoc build " \
                         "RECIPE\n"


def test_a_ray_submission_id_names_the_run_and_the_plan_and_is_never_reused(tmp_path):
    from dpoc.launch.jobs import submission_id

    out = tmp_path / "b"
    build(RECIPES / "tiny_cpu.yaml", out=out)
    job = Job.from_build(out)
    base = f"dpoc-b-{plan_hash(out)[:12]}"  # the run's name: a build is named after its directory
    assert submission_id(job, set()) == base
    assert submission_id(job, {base, f"{base}-2"}) == f"{base}-3"
