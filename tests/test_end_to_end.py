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
    # two nodes, with the reference's log-probs computed before training by reference.sh's pass, which both
    # node scripts join: equal to the live reference of 1 process
    "2 local nodes": ["hardware.hosts=[127.0.0.1,127.0.0.1]", "hardware.nodes=2", "hardware.devices_per_node=1",
                      "dpo.reference=precomputed"],
    "cp2": ["parallelism.cp=2"],  # 2 processes on one node, each holding half of every sequence
}
PRECOMPUTED = "2 local nodes"


@pytest.fixture(scope="module")
def dataset():
    """The tiny recipe's data, preprocessed once per session by the rendered preprocess.sh."""
    return tiny_dataset()


def _env() -> dict[str, str]:
    return script_env(DPOC_MASTER_PORT=str(free_port()))


def _private_copy(dataset: str, where: Path) -> Path:
    """The shared dataset's files linked into a folder of this test's: a precomputed reference is written next
    to its dataset, and the shared one must get none."""
    prefix = where / "orca_tiny"
    where.mkdir(parents=True)
    shared = Path(dataset)
    for f in shared.parent.glob(f"{shared.name}_*"):
        (where / f.name).symlink_to(f)
    return prefix


@pytest.mark.slow
def test_tiny_recipe_trains_from_its_rendered_files_alike_in_1_process_on_2_nodes_and_cp2(dataset, tmp_path):
    losses = {}
    for name, overrides in LAYOUTS.items():
        out, run_dir = tmp_path / name / "build", tmp_path / name / "run"
        prefix = _private_copy(dataset, tmp_path / name / "data") if name == PRECOMPUTED else Path(dataset)
        build(RECIPES / "tiny_cpu.yaml", [*overrides, "training.train_iters=4", f"dataset.output_prefix={prefix}",
                                          f"run_dir={run_dir}"], out=out)
        run = subprocess.run(["bash", str(out / "launch.sh")], cwd=REPO, env=_env(), capture_output=True, text=True,
                             timeout=900)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "[dpoc] node 0/" in run.stderr and "fresh run" in run.stderr
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [s["step"] for s in steps] == [1, 2, 3, 4]
        assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "lr", "samples_per_s", "tokens_per_s"} <= set(steps[0])
        # policy and reference start from the same seeded init: before the first update the margin is zero
        # (the precomputed reference too: the policy is the reference there)
        assert abs(steps[0]["rewards/margins"]) < 1e-6 and abs(steps[0]["loss"] - 0.6931471805599453) < 1e-6
        if name == PRECOMPUTED:  # both node scripts joined reference.sh's pass; rank 0 wrote the file
            assert "reference.sh computes them before training" in run.stderr  # the preflight's note
            (table,) = prefix.parent.glob("orca_tiny_reference-*.npz")
            assert f"wrote {table}" in run.stderr
            assert f"precomputed log-probs: {table}" in (run_dir / "train.log").read_text()
        else:
            assert steps[0]["rewards/margins"] == 0.0
        losses[name] = [s["loss"] for s in steps]
    # the compiler's layouts are real: every layout trains the same model on the same batches
    one = losses["1 process"]
    for name, seen in losses.items():
        assert seen == pytest.approx(one, rel=1e-5), name


@pytest.mark.slow
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


@pytest.mark.slow
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
