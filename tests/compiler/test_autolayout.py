"""The planner inside the compiler: open knobs are chosen, pinned ones kept, and memory is checked."""

from __future__ import annotations

import json

from dpoc.compiler.pipeline import plan_recipe
from tests.conftest import RECIPES

GUIDE, A2 = RECIPES / "qwen3_30b.yaml", RECIPES / "qwen3_30b_a2.yaml"
UNKNOWN = "~training.length_stats"  # the guide recipes without their stated length assumption: every length 4096


def test_auto_layout_is_chosen_by_the_planner_and_fits():
    plan = plan_recipe(GUIDE, ["parallelism=auto"])
    assert plan.source_of("layout.tp").source == "derived:planner"
    assert "the planner's best of" in plan.source_of("layout.ep").why
    assert plan.estimate["memory"]["fits"] is True
    assert plan.estimate["memory"]["peak_gib"] <= 64
    assert plan.estimate["throughput"]["samples_per_s"] > 0


def test_pinned_knobs_are_kept_and_the_rest_chosen(tmp_path):
    recipe = tmp_path / "r.yaml"
    text = GUIDE.read_text()
    recipe.write_text(text[:text.index("parallelism:")] + "parallelism: {tp: 1}\n" + text[text.index("checkpoint:"):])
    plan = plan_recipe(recipe)
    assert plan.layout.tp == 1 and plan.source_of("layout.tp").source == "user"
    assert plan.source_of("layout.pp").source == "derived:planner"
    assert plan.source_of("layout.ep").source == "derived:planner"


def test_each_target_searches_only_what_it_can_express():
    dpoc_plan = plan_recipe(GUIDE, ["parallelism=auto", "training.seq_length=16384"])
    assert dpoc_plan.layout.cp == 1 and dpoc_plan.layout.noop_layers == ()
    ms_plan = plan_recipe(GUIDE, ["parallelism=auto", "runtime=mindspeed-rl"])
    assert ms_plan.layout.etp == ms_plan.layout.tp


def test_too_small_hardware_says_how_many_devices_are_needed(dpoc_cli, tmp_path):
    result = dpoc_cli("build", A2, "parallelism=auto", "hardware.nodes=1", "hardware.hosts=[10.0.0.1]",
                      "-o", tmp_path / "o")
    assert result.code == 2
    (line,) = result.err.splitlines()
    assert line.startswith(f"{A2}: hardware.nodes: does not fit: pipeline stage ")
    assert line.endswith("on 1 × 8 atlas-a2; smallest need is 16 devices (2 nodes)")


def test_pinned_layout_whose_weights_do_not_fit_is_refused(dpoc_cli, tmp_path):
    result = dpoc_cli("build", A2, "parallelism.pp=1", "parallelism.tp=1", "parallelism.etp=1", "-o", tmp_path / "o")
    assert result.code == 2
    assert f"{A2}: hardware.nodes: does not fit: pipeline stage 0 needs " in result.err
    assert "valid: unpin knobs and let the planner choose, or see `dpoc plan` for layouts that fit" in result.err


def test_guide_recipes_fit_with_no_warning_and_unknown_lengths_warn(dpoc_cli, tmp_path):
    """The guide's two jobs ran at their layouts; with the stated orca length assumption they plan as fitting.
    With lengths unknown every in-flight micro-batch may be 4096 tokens: the pinned layout builds with a
    warning (8 x 6 layers of 0.69 GiB activations at stage 0 on top of 26.4 GiB static)."""
    for recipe in (GUIDE, A2):
        result = dpoc_cli("build", recipe, "-o", tmp_path / recipe.stem)
        assert result.code == 0 and "warning" not in result.err, result.err
        memory = json.loads((tmp_path / recipe.stem / "plan.json").read_text())["estimate"]["memory"]
        assert memory["fits"] is True and memory["peak_gib"] < 64
    unknown = dpoc_cli("build", GUIDE, UNKNOWN, "-o", tmp_path / "p")
    assert unknown.code == 0
    assert ("warning: parallelism: does not fit: pipeline stage 0 needs up to 68.6 GiB per device of 64 GiB "
            "(26.4 GiB static") in unknown.err
    quiet = dpoc_cli("build", GUIDE, UNKNOWN, "training.mean_seq_length=600", "-o", tmp_path / "q")
    assert quiet.code == 0 and "does not fit" not in quiet.err


def test_guide_static_memory_is_the_worked_example():
    """formulas-and-anchors §1.6: TP2 PP8 EP1 on 32 dies holds 22.6 GiB policy + 3.8 GiB reference."""
    stage0 = plan_recipe(GUIDE).estimate["memory"]["stages"][0]
    policy = stage0["weights_gib"] + stage0["gradients_gib"] + stage0["optimizer_gib"]
    assert round(policy, 1) == 22.6 and round(stage0["reference_gib"], 1) == 3.8


def test_plan_command_ranks_layouts(dpoc_cli, tmp_path):
    chart = tmp_path / "mem.svg"
    result = dpoc_cli("plan", GUIDE, "parallelism=auto", "--json", "--top", "5", "--chart", chart)
    assert result.code == 0
    data = json.loads(result.out)
    speeds = [c["throughput"]["samples_per_s"] for c in data["ranked"]]
    assert len(speeds) == 5 and speeds == sorted(speeds, reverse=True)
    assert all(c["memory"]["fits"] for c in data["ranked"])
    assert all(not c["memory"]["fits"] for c in data["nearest_over_memory"])
    assert data["evaluated"] > data["rule_rejected"] + data["over_memory"]
    svg = chart.read_text()
    assert svg.startswith("<svg") and svg.count("<rect") >= 10 and "pipeline stage" in svg
    table = dpoc_cli("plan", GUIDE, "parallelism=auto", "--top", "3")
    assert table.code == 0 and "Best: tp=" in table.out and "layouts tried:" in table.out


def test_plan_command_shows_where_the_pinned_layout_ranks(dpoc_cli):
    result = dpoc_cli("plan", GUIDE, UNKNOWN, "--json", "--top", "3")
    assert result.code == 0
    data = json.loads(result.out)
    own = data["recipe_layout"]
    assert (own["knobs"]["tp"], own["knobs"]["pp"], own["knobs"]["ep"]) == (2, 8, 1)
    # slower than every shown layout, so ranked below them
    assert own["throughput"]["samples_per_s"] < data["ranked"][-1]["throughput"]["samples_per_s"]
    # over the memory model's threshold, as the nearest over-memory layouts: not ranked among those that fit
    assert own["rank"] is None and own["memory"]["fits"] is False
    assert own["warnings"][0].startswith("parallelism: does not fit: pipeline stage 0 needs up to 68.6 GiB")
    assert len(data["ranked"]) == 3  # pins lifted: the whole space is ranked


def test_plan_labels_the_recipes_layout_as_it_labels_the_others(dpoc_cli):
    """One threshold (the estimate's peak against the device's memory) and one vocabulary: "fit" / "do not fit"."""
    table = dpoc_cli("plan", GUIDE, UNKNOWN, "--top", "3").out
    summary = next(line for line in table.splitlines() if line.startswith(("1", "2", "3", "4", "5", "6", "7", "8", "9"))
                   and "layouts tried" in line)
    assert summary.split(":")[1].split(".")[0].strip().endswith("do not fit, 290 fit")
    text = " ".join(table.split())  # rich wraps long lines
    assert ("Recipe's layout: tp=2 pp=8 vpp=1 cp=1 ep=1 etp=2 micro_batch_size=1 recompute=none — 6.85 pairs/s "
            "predicted; does not fit: stage 0 needs 68.6 GiB of 64 GiB (+4.6), so it is not among the 290 that fit "
            "(it would rank 77); it builds with a warning") in text
    assert "Does not fit: tp=1 pp=4 vpp=1 cp=1 ep=2 etp=1 micro_batch_size=1 recompute=full — stage 3 needs 64.2 GiB" \
        in text
    assert "may not fit" not in table and "Rejected:" not in table
    fits = " ".join(dpoc_cli("plan", GUIDE, UNKNOWN, "parallelism.tp=4", "parallelism.pp=1", "parallelism.ep=4",
                             "parallelism.etp=4", "parallelism.micro_batch_size=1", "parallelism.vpp=1",
                             "--top", "1").out.split())
    assert "Recipe's layout: tp=4 pp=1 vpp=1 cp=1 ep=4 etp=4 micro_batch_size=1 recompute=none — 8.57 pairs/s " \
        "predicted, rank 1 of the 290 that fit; stage 0 needs 61.4 GiB of 64 GiB" in fits


def test_plan_asks_what_if_of_any_size_without_host_addresses(dpoc_cli, tmp_path):
    """The host list never matters to planning: 64 nodes are planned without 64 addresses (a build needs them)."""
    result = dpoc_cli("plan", GUIDE, "hardware.nodes=64", "--json", "--top", "3")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["recipe_layout"]["valid"] is True and data["recipe_layout"]["problems"] == []
    assert (data["recipe_layout"]["knobs"]["tp"], data["recipe_layout"]["knobs"]["pp"]) == (2, 8)
    assert len(data["ranked"]) == 3 and data["no_fit"] == []
    assert "hardware.hosts" not in result.err
    build = dpoc_cli("build", GUIDE, "hardware.nodes=64", "-o", tmp_path / "o")
    assert build.code == 2 and build.err.splitlines() == [
        f"{GUIDE}: hardware.hosts: lists 2 hosts but hardware.nodes is 64; valid: one host per node"]


PP8_ON_94_LAYERS = (f"{GUIDE}: parallelism.pp: pp=8 does not divide 94 layers; valid: pp in {{1, 2, 47, 94}}, or give "
                    "parallelism.num_layer_list or parallelism.noop_layers")


def test_plan_ranks_even_when_the_recipes_own_layout_is_invalid_for_the_model(dpoc_cli):
    result = dpoc_cli("plan", GUIDE, "model.preset=qwen3-235b-a22b", "hardware.nodes=8", "--json", "--top", "4")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["recipe_layout"] == {"valid": False, "problems": [PP8_ON_94_LAYERS]}
    assert len(data["ranked"]) == 4 and data["no_fit"] == []
    for c in data["ranked"]:  # every ranked layout splits the 94 layers legally
        layer_list = c["knobs"].get("num_layer_list")
        assert sum(layer_list) == 94 if layer_list else 94 % c["knobs"]["pp"] == 0
    table = dpoc_cli("plan", GUIDE, "model.preset=qwen3-235b-a22b", "hardware.nodes=8", "--top", "2")
    assert table.code == 0 and "Best: tp=" in table.out
    assert f"Recipe's layout is invalid:\n  {PP8_ON_94_LAYERS}\n" in table.out


def test_plan_says_how_much_hardware_when_nothing_fits_and_still_exits_0(dpoc_cli):
    result = dpoc_cli("plan", GUIDE, "model.preset=qwen3-235b-a22b", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["ranked"] == [] and data["nearest_over_memory"]
    (line,) = data["no_fit"]
    assert line.startswith(f"{GUIDE}: hardware.nodes: does not fit: pipeline stage ")
    assert line.endswith("on 2 × 16 atlas-a3; smallest need is 128 devices (8 nodes)")
    bad = dpoc_cli("plan", GUIDE, "training.lr=-1")  # bad input is still an error
    assert bad.code == 2 and bad.err == f"{GUIDE}: training.lr: must be > 0 (got -1)\n"
