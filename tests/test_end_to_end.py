"""The product, end to end on CPU: `dpoc build` → the rendered preprocess.sh → the rendered launch.sh starting
two "nodes" on localhost (each its own torchrun, gloo on 127.0.0.1) → training from megatron.args."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from dpoc.common.ports import free_port
from dpoc.compiler.pipeline import build
from tests.conftest import RECIPES, REPO, script_env, tiny_dataset

LAYOUTS = {  # name: build overrides (tp/pp/ep layouts against one process: tests/runtime/test_runtime_train.py)
    "1 process": ["hardware.devices_per_node=1"],
    "2 local nodes": ["hardware.hosts=[127.0.0.1,127.0.0.1]", "hardware.nodes=2", "hardware.devices_per_node=1"],
    "cp2": ["parallelism.cp=2"],  # 2 processes on one node, each holding half of every sequence
}


@pytest.fixture(scope="module")
def dataset():
    """The tiny recipe's data, preprocessed once per session by the rendered preprocess.sh."""
    return tiny_dataset()


def _env() -> dict[str, str]:
    return script_env(DPOC_MASTER_PORT=str(free_port()))


@pytest.mark.slow
def test_tiny_recipe_trains_from_its_rendered_files_in_1_process_and_on_2_nodes(dataset, tmp_path):
    losses = {}
    for name, overrides in LAYOUTS.items():
        out, run_dir = tmp_path / name / "build", tmp_path / name / "run"
        build(RECIPES / "tiny_cpu.yaml", [*overrides, "training.train_iters=4", f"dataset.output_prefix={dataset}",
                                          f"run_dir={run_dir}"], out=out)
        run = subprocess.run(["bash", str(out / "launch.sh")], cwd=REPO, env=_env(), capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "[dpoc] node 0/" in run.stderr and "fresh run" in run.stderr
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == [1, 2, 3, 4]
        assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "lr", "samples_per_s", "tokens_per_s"} <= set(steps[0])
        # policy and reference start from the same seeded init: before the first update the margin is zero
        assert steps[0]["rewards/margins"] == 0.0 and abs(steps[0]["loss"] - 0.6931471805599453) < 1e-6
        losses[name] = [s["loss"] for s in steps]
    # the compiler's layouts are real: every layout trains the same model on the same batches
    one = losses["1 process"]
    for name, seen in losses.items():
        assert seen == pytest.approx(one, rel=1e-5), name


def test_a_failing_node_fails_the_launch(tmp_path):
    out = tmp_path / "build"
    build(RECIPES / "tiny_cpu.yaml", ["hardware.hosts=[127.0.0.1,127.0.0.1]", "hardware.nodes=2",
                                      "hardware.devices_per_node=1", f"dataset.output_prefix={tmp_path}/none"],
          out=out)
    run = subprocess.run(["bash", str(out / "launch.sh")], cwd=REPO, env=script_env(), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert f"{tmp_path}/none_packed_chosen_input_ids_document.bin: (file): missing preprocessed dataset (8 of 8 files " \
           "absent)" in run.stderr


def test_an_input_error_in_the_reference_pass_exits_2(tmp_path):
    """reference.sh run by hand (a node script runs it the same way): torchrun reports the failed ranks as exit 1,
    the script exits 2, as the node scripts do, with the rank's line once."""
    out = tmp_path / "build"
    build(RECIPES / "tiny_cpu.yaml", ["dpo.reference=precomputed", f"dataset.output_prefix={tmp_path}/none"], out=out)
    run = subprocess.run(["bash", str(out / "reference.sh")], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.count(f"{tmp_path}/none_packed_chosen_input_ids_document.bin") == 1
    assert run.stderr.rstrip().endswith("[dpoc] node 0/1: reference log-probs: input error (exit 2): the lines above "
                                        "say what to fix; a restart cannot")


@pytest.mark.slow
def test_precomputed_reference_runs_its_pass_on_every_node_before_training(dataset, tmp_path):
    """Two local nodes: both node scripts join reference.sh's pass (rank 0 writes the file), then train from
    it; before the first update the policy is the reference, so the margin is 0 and the loss ln 2."""
    out, run_dir = tmp_path / "build", tmp_path / "run"
    prefix = tmp_path / "data" / "orca_tiny"
    prefix.parent.mkdir()
    shared = Path(dataset)
    for f in shared.parent.glob(f"{shared.name}_*"):  # a private copy: the shared dataset gets no reference file
        (prefix.parent / f.name).symlink_to(f)
    build(RECIPES / "tiny_cpu.yaml", [*LAYOUTS["2 local nodes"], "training.train_iters=2", "training.warmup_iters=0",
                                      "dpo.reference=precomputed",
                                      f"dataset.output_prefix={prefix}", f"run_dir={run_dir}"], out=out)
    run = subprocess.run(["bash", str(out / "launch.sh")], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "reference.sh computes them before training" in run.stderr  # the preflight's note
    (table,) = prefix.parent.glob("orca_tiny_reference-*.npz")
    assert f"wrote {table}" in run.stderr
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    assert abs(steps[0]["rewards/margins"]) < 1e-6 and abs(steps[0]["loss"] - 0.6931471805599453) < 1e-6
    assert f"precomputed log-probs: {table}" in (run_dir / "train.log").read_text()
