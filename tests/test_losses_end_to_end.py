"""Reference-free losses end to end on CPU: `dpoc build` → the rendered launch.sh → training with no reference
built, loaded or run; and the memory probe of a real step, which counts no reference bytes."""

from __future__ import annotations

import json
import subprocess

import pytest

from dpoc.common.ports import free_port
from dpoc.compiler.pipeline import build
from tests.conftest import NO_DEVICE_CHECK, RECIPES, REPO, measured_memory, script_env, tiny_dataset

BETA = 2.0


@pytest.fixture(scope="module")
def dataset():
    return tiny_dataset()


@pytest.mark.slow
def test_simpo_trains_from_its_rendered_files_without_a_reference(dataset, tmp_path):
    out, run_dir = tmp_path / "build", tmp_path / "run"
    build(RECIPES / "tiny_cpu.yaml", ["hardware.devices_per_node=1", "training.train_iters=3", "training.warmup_iters=0",
                                      "dpo.loss=simpo",
                                      f"dpo.beta={BETA}", "dpo.simpo_gamma=0.5", "dpo.cpo_alpha=0.1",
                                      f"dataset.output_prefix={dataset}", f"run_dir={run_dir}"], out=out)
    run = subprocess.run(["bash", str(out / "launch.sh")], cwd=REPO, env=script_env(DPOC_MASTER_PORT=str(free_port()),
                                                                                 **NO_DEVICE_CHECK),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]
    first = steps[0]
    # TRL's CPOTrainer meaning: rewards are beta x the policy's length-averaged log-probs
    assert first["rewards/chosen"] == pytest.approx(BETA * first["logps/chosen"], rel=1e-5)
    assert first["rewards/margins"] == pytest.approx(first["rewards/chosen"] - first["rewards/rejected"], rel=1e-4)
    # the NLL is minus the averaged chosen log-prob, token-weighted; the sigmoid part is positive
    assert first["logps/chosen"] < 0 < first["nll_loss"] and first["loss"] > 0.1 * first["nll_loss"]
    assert "reference from none (a reference-free loss)" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_a_reference_free_step_holds_no_reference():
    """The memory probe of one real step: a live-reference run holds the reference's weights, simpo none. The
    sigmoid run is the tiny recipe's default loss, the planner memory test's `single` run (shared)."""
    plan, (sigmoid,) = measured_memory("single")
    assert plan.dpo.loss == ("sigmoid",)
    _, (simpo,) = measured_memory("single", "dpo.loss=simpo")
    counted = {"sigmoid": sigmoid, "simpo": simpo}
    assert counted["sigmoid"]["reference"] > 0 and counted["simpo"]["reference"] == 0
    assert counted["simpo"]["weights"] == counted["sigmoid"]["weights"]
