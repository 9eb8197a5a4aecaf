"""LoRA in `dpoc plan` and `dpoc explain`: the search runs over LoRA layouts, the LoRA terms are shown beside
the full-parameter alternative, and the issue's question — does Qwen3-235B-A22B LoRA-DPO at seq 4096 fit one
Atlas A3 node (16 dies)? — gets the planner's answer."""

from __future__ import annotations

import json

import pytest

from tests.compiler.test_mindspeed_lora import EXPRESSIBLE, MOE

Q235 = """\
model: {preset: qwen3-235b-a22b}
hardware: {preset: atlas-a3, nodes: 1}
dataset: {path: ./pairs.jsonl}
training: {seq_length: 4096, global_batch_size: 64, train_iters: 10, lr: 1.0e-5}
dpo: {loss: sigmoid}
lora: {rank: 16, alpha: 32}
parallelism: auto
"""


@pytest.fixture
def q235(tmp_path):
    path = tmp_path / "q235.yaml"
    path.write_text(Q235)
    return path


@pytest.mark.slow
def test_qwen3_235b_lora_fits_one_a3_node_and_full_parameter_needs_eight(dpoc_cli, q235):
    result = dpoc_cli("plan", q235, "--json", "--top", "3")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    best = data["ranked"][0]
    assert {k: best["knobs"][k] for k in ("tp", "pp", "ep", "etp", "recompute")} == {
        "tp": 2, "pp": 1, "ep": 8, "etp": 2, "recompute": "full"}
    stage = best["memory"]["stages"][0]
    assert best["memory"]["fits"] and stage["reference_gib"] == 0 and stage["gradients_gib"] < 0.1
    assert data["full_parameter"]["best"] is None
    assert data["full_parameter"]["no_fit"] == [
        "does not fit: pipeline stage 1 needs 287.1 GiB per device (incl. 4.9 GiB reserve) of 64 GiB on 1 × 16 "
        "atlas-a3; smallest need is 128 devices (8 nodes)"]
    # without the lora section no layout fits the node at all
    full = json.loads(dpoc_cli("plan", q235, "~lora", "--json").out)
    assert full["ranked"] == [] and full["full_parameter"] is None


@pytest.mark.slow
def test_the_table_shows_the_lora_terms_beside_the_full_parameter_alternative(dpoc_cli, q235):
    out = dpoc_cli("plan", q235, "--top", "1").out
    assert "LoRA rank 16 on linear_qkv, linear_proj: stage 0 holds the frozen base and adapters in 34.0 GiB, the " \
           "adapters' gradients and optimizer state in 0.13 GiB, reference copy 0.0 GiB" in out
    assert "Full-parameter alternative: does not fit: pipeline stage 1 needs 287.1 GiB" in out
    # on 8 nodes the full-parameter alternative has a layout of its own
    eight = dpoc_cli("plan", q235, "hardware.nodes=8", "--top", "1").out
    assert "Full-parameter alternative: best tp=" in eight


def test_explain_shows_the_full_parameter_alternative(dpoc_cli):
    rows = {ln.split()[0]: ln for ln in dpoc_cli("explain", MOE, *EXPRESSIBLE).out.splitlines()}
    assert "LoRA's alternative: this layout training every parameter" in rows["estimate.full_parameter.peak_gib"]
    assert rows["estimate.full_parameter.fits"].split()[1] in ("true", "false")
    assert rows["lora.rank"].split()[1:3] == ["8", "user:command"]


def test_the_shipped_235b_lora_recipe_fits_its_one_node():
    from dpoc.compiler.pipeline import plan_recipe
    from tests.conftest import RECIPES

    plan = plan_recipe(RECIPES / "qwen3_235b_lora.yaml")
    assert (plan.hardware.nodes, plan.hardware.devices_per_node, plan.lora.rank) == (1, 16, 16)
    assert (plan.layout.tp, plan.layout.pp, plan.layout.ep, plan.layout.dp) == (2, 1, 8, 8)
    assert plan.estimate["memory"]["fits"] and not plan.estimate["full_parameter"]["fits"]
