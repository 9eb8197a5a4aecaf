"""Command-line overrides, applied in order as Hydra does: `key=value` sets, `~key` deletes a recipe key so
that the preset's value or the default applies again."""

from __future__ import annotations

from dpoc.compiler.pipeline import plan_recipe
from tests.conftest import RECIPES

GUIDE, TINY = RECIPES / "qwen3_30b.yaml", RECIPES / "tiny_cpu.yaml"


def test_deleting_a_recipe_key_brings_back_the_presets_value():
    plan = plan_recipe(TINY, ["~hardware.devices_per_node"])
    assert plan.hardware.devices_per_node == 1
    assert plan.source_of("hardware.devices_per_node").source == "preset:cpu"
    assert plan_recipe(TINY).hardware.devices_per_node == 2


def test_deleting_a_pinned_knob_lets_the_planner_choose_it():
    plan = plan_recipe(TINY, ["~parallelism.micro_batch_size"])
    assert plan.source_of("layout.micro_batch_size").source == "derived:planner"
    assert plan.source_of("layout.tp").source == "user"


def test_deleting_the_host_list_for_one_node():
    plan = plan_recipe(GUIDE, ["~hardware.hosts", "hardware.nodes=1", "parallelism=auto"])
    assert plan.cluster.hosts == ("127.0.0.1",) and plan.hardware.nodes == 1
    assert plan.source_of("cluster.hosts").why == "one node: this machine"


def test_overrides_apply_in_order(dpoc_cli, tmp_path):
    """`parallelism=auto parallelism.tp=4` opens the layout, then pins one knob; a later ~key undoes an earlier set."""
    plan = plan_recipe(GUIDE, ["parallelism=auto", "parallelism.tp=4"])
    assert plan.layout.tp == 4 and plan.source_of("layout.tp").source == "user:command line"
    assert plan.source_of("layout.pp").source == "derived:planner"
    result = dpoc_cli("validate", GUIDE, "--set", "training.lr=1e-7", "--set", "~training.lr")
    assert result.code == 2 and result.err == f"{GUIDE}: training.lr: is required\n"


def test_deleting_what_the_recipe_does_not_set_is_an_error_with_did_you_mean(dpoc_cli, tmp_path):
    cases = [
        ("~hardware.host", "~hardware.host: the recipe has no such key to delete (did you mean 'hardware.hosts'? "
                           "valid: hardware.hosts, hardware.nodes, hardware.preset)"),
        ("~parallelism.tpp", "~parallelism.tpp: the recipe has no such key to delete (did you mean 'parallelism.tp'? "
                             "valid: parallelism.cp, parallelism.ep, parallelism.etp, parallelism.micro_batch_size, "
                             "parallelism.pp, parallelism.recompute, parallelism.tp, parallelism.vpp)"),
        ("~runtime", "~runtime: the recipe has no such key to delete (valid: checkpoint, dataset, dpo, hardware, "
                     "model, parallelism, training)"),
        ("~hardware.env", "~hardware.env: comes from preset 'atlas-a3', not the recipe: nothing to delete (set "
                          "hardware.env=... to change it)"),
        ("~model.moe.topk", "~model.moe.topk: comes from preset 'qwen3-30b-a3b', not the recipe: nothing to delete "
                            "(set model.moe.topk=... to change it)"),
        ("~training.lr=1e-7", "~training.lr=1e-7: a deletion is ~key alone, e.g. ~hardware.hosts (no value)"),
    ]
    for override, message in cases:
        result = dpoc_cli("build", GUIDE, override, "-o", tmp_path / "o")
        assert result.code == 2 and result.err == f"{GUIDE}: {message}\n", override
    assert not (tmp_path / "o").exists()
