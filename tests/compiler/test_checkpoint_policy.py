"""The checkpoint policy: the default interval from the planner's predicted step time (a crash loses ~30 minutes), and
checkpoint.keep."""

from __future__ import annotations

import json

import pytest

from dpoc.compiler.pipeline import build
from dpoc.compiler.resolve.resolver import save_interval
from tests.conftest import RECIPES


@pytest.mark.parametrize(("step_s", "train_iters", "expected"), [
    (9.3333, 1000, 192),  # 1800 s / 9.33 s
    (0.1137, 30, 30),  # the whole run is shorter than the budget: one save after the last step
    (3600.0, 10, 1),  # a step longer than the budget still saves every step
    (60.0, 100, 30),
])
def test_interval_bounds_the_lost_work(step_s, train_iters, expected):
    assert save_interval(step_s, train_iters) == expected


def test_explain_states_the_numbers(dpoc_cli):
    unknown = "~training.length_stats"  # every sequence 4096 tokens long: a step long enough to save within the run
    rows = {ln.split()[0]: ln for ln in dpoc_cli("explain", RECIPES / "qwen3_30b.yaml", unknown).out.splitlines()}
    assert rows["training.save_interval"].split()[1:3] == ["192", "derived:planner"]
    assert rows["training.save_interval"].endswith(
        "(a crash loses at most ~30 min of work: predicted 9.35 s/step (global batch 64 / 6.846 pairs/s) -> every "
        "192 steps (~30 min))")
    assert rows["checkpoint.keep"].split()[1:3] == ["2", "default"]


def test_a_recipes_interval_and_keep_reach_the_runtime(tmp_path):
    out = tmp_path / "b"
    build(RECIPES / "tiny_cpu.yaml", ["training.save_interval=7", "checkpoint.keep=3"], out=out)
    lines = (out / "megatron.args").read_text().splitlines()
    assert "--save-interval 7" in lines and "--dpoc-keep-checkpoints 3" in lines
    plan = json.loads((out / "plan.json").read_text())
    assert plan["provenance"]["training.save_interval"]["source"].startswith("user")
    assert plan["checkpoint"]["keep"] == 3


def test_mindspeed_rl_cannot_express_keep(dpoc_cli, tmp_path):
    result = dpoc_cli("build", RECIPES / "qwen3_30b.yaml", "runtime=mindspeed-rl", "checkpoint.keep=3",
                      "-o", tmp_path / "b")
    assert result.code == 2
    assert result.err.strip() == (f"{RECIPES / 'qwen3_30b.yaml'}: checkpoint.keep: 3: MindSpeed-RL keeps every "
                                  "checkpoint it saves; valid: leave it unset, or runtime=dpoc")
    assert dpoc_cli("build", RECIPES / "qwen3_30b.yaml", "runtime=mindspeed-rl", "-o", tmp_path / "c").code == 0
