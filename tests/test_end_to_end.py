"""The product, end to end on CPU: `dpoc build` → the rendered preprocess.sh → the rendered launch.sh starting
two "nodes" on localhost (each its own torchrun, gloo on 127.0.0.1) → training from megatron.args."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from dpoc.compile import build
from tests.conftest import RECIPES, REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tiny_recipe_preprocesses_and_trains_on_two_local_nodes(tmp_path):
    out = tmp_path / "build"
    build(RECIPES / "tiny_cpu.yaml", [
        "hardware.hosts=[127.0.0.1,127.0.0.1]", "hardware.nodes=2", "hardware.devices_per_node=1",
        "training.train_iters=4", f"dataset.output_prefix={tmp_path}/data/orca_tiny", f"run_dir={tmp_path}/run",
    ], out=out)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "DPOC_MASTER_PORT": str(_free_port())}

    pre = subprocess.run(["bash", str(out / "preprocess.sh")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert pre.returncode == 0, pre.stderr[-2000:]
    stats = json.loads((tmp_path / "data/orca_tiny_stats.json").read_text())
    assert stats["pairs_kept"] == 256

    run = subprocess.run(["bash", str(out / "launch.sh")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "[dpoc] node 0/2: fresh run" in run.stderr and "[dpoc] node 1/2: fresh run" in run.stderr
    steps = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "grad_norm", "lr", "samples_per_s", "tokens_per_s"} <= set(steps[0])
    # policy and reference start from the same seeded init: before the first update the margin is exactly zero
    assert steps[0]["rewards/margins"] == 0.0 and abs(steps[0]["loss"] - 0.6931471805599453) < 1e-6


def test_a_failing_node_fails_the_launch(tmp_path):
    out = tmp_path / "build"
    build(RECIPES / "tiny_cpu.yaml", ["hardware.hosts=[127.0.0.1,127.0.0.1]", "hardware.nodes=2",
                                      "hardware.devices_per_node=1", f"dataset.output_prefix={tmp_path}/none"],
          out=out)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "PYTHONPATH": str(REPO)}
    run = subprocess.run(["bash", str(out / "launch.sh")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert f"{tmp_path}/none_packed_chosen_input_ids_document.bin: (file): missing preprocessed dataset (9 of 9 files " \
           "absent)" in run.stderr
