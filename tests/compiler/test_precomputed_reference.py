"""`dpo.reference: precomputed` through the compiler: megatron.args, reference.sh, the plan's estimate for the
mode (no reference held or run in the step; the precompute pass modelled on its own), and `dpoc plan` showing
both modes; `training.length_stats` read by load, with its problems named."""

from __future__ import annotations

import json

from dpoc.compiler.pipeline import build, plan_recipe
from dpoc.contract import megatron_args
from tests.conftest import RECIPES

GUIDE, TINY = RECIPES / "qwen3_30b.yaml", RECIPES / "tiny_cpu.yaml"


def test_precomputed_reaches_megatron_args_and_renders_its_pass(tmp_path):
    out = tmp_path / "b"
    build(TINY, ["dpo.reference=precomputed"], out=out)
    args = megatron_args.parse([f"@{out / 'megatron.args'}"])
    plan = json.loads((out / "plan.json").read_text())
    assert args.dpoc_reference == "precomputed"
    assert args.dpoc_reference_micro_batch_size == plan["dpo"]["reference_micro_batch_size"] == 16
    assert plan["provenance"]["dpo.reference"]["source"].startswith("user")
    assert plan["estimate"]["reference"] == "precomputed" and plan["estimate"]["reference_pass"]["fits"]
    assert 'bash "$BUILD_DIR/reference.sh" 0' in (out / "nodes/node-0.sh").read_text()
    assert '-m dpoc.runtime.precompute "@$BUILD_DIR/megatron.args"' in (out / "reference.sh").read_text()
    live = tmp_path / "live"
    build(TINY, [], out=live)
    assert not (live / "reference.sh").exists()
    assert megatron_args.parse([f"@{live / 'megatron.args'}"]).dpoc_reference == "live"


def test_a_pinned_pass_micro_batch_is_kept(tmp_path):
    plan = plan_recipe(TINY, ["dpo.reference=precomputed", "dpo.reference_micro_batch_size=3"])
    assert plan.dpo.reference_micro_batch_size == 3
    assert plan.estimate["reference_pass"]["micro_batch_size"] == 3


def test_a_pass_micro_batch_without_the_pass_is_refused(dpoc_cli, tmp_path):
    result = dpoc_cli("build", TINY, "dpo.reference_micro_batch_size=4", "-o", tmp_path / "o")
    assert result.code == 2 and not (tmp_path / "o").exists()
    assert result.err.endswith("recipes/tiny_cpu.yaml: dpo.reference_micro_batch_size: 4: sizes the precompute pass, "
                               "which a live reference does not run (valid: leave it out, or dpo.reference: "
                               "precomputed)\n")


def test_the_estimate_drops_the_reference_at_the_same_layout():
    live = plan_recipe(GUIDE).estimate
    pre = plan_recipe(GUIDE, ["dpo.reference=precomputed"]).estimate
    (live0, pre0) = (e["memory"]["stages"][0] for e in (live, pre))
    assert live0["reference_gib"] > 3 and pre0["reference_gib"] == 0
    assert pre["memory"]["peak_gib"] < live["memory"]["peak_gib"] - live0["reference_gib"] + 1e-9
    # no reference forward: 3 of the 4 passes of a live step (fwd + bwd = 3 forwards' FLOPs, + 1 reference)
    assert pre["throughput"]["samples_per_s"] > 1.2 * live["throughput"]["samples_per_s"]
    assert pre["throughput"]["dpo_mfu"] == pre["throughput"]["mfu"]


def test_plan_shows_the_best_layout_of_each_mode(dpoc_cli):
    result = dpoc_cli("plan", GUIDE, "parallelism=auto", "~training.length_stats", "--json", "--top", "1")
    modes = json.loads(result.out)["reference_modes"]
    live, pre = modes["live"], modes["precomputed"]
    assert pre["throughput"]["samples_per_s"] > live["throughput"]["samples_per_s"]
    assert pre["memory"]["peak_gib"] <= live["memory"]["peak_gib"]
    # without the reference's weights and forward, a smaller model-parallel group fits and is fastest
    assert pre["knobs"]["tp"] * pre["knobs"]["pp"] < live["knobs"]["tp"] * live["knobs"]["pp"]
    assert pre["reference_pass"]["micro_batch_size"] >= 1
    table = dpoc_cli("plan", GUIDE, "parallelism=auto", "--top", "1").out
    assert "Reference live: best " in table and "Reference precomputed: best " in table
    assert "precompute pass" in table


def _stats(pairs: int = 100) -> dict:
    """A _stats.json's histograms (the shape dpoc preprocess writes): every pair 100..199 tokens a side."""
    edges = list(range(0, 4097, 64))
    longer = [0] * 64
    longer[1], longer[2] = pairs // 2, pairs - pairs // 2
    tokens = [0] * 64
    tokens[1], tokens[2] = pairs // 2, pairs - pairs // 2  # 128-wide bins: 128..383 tokens a pair
    return {"longest": {"chosen": 190, "rejected": 180},
            "length_histogram": {"bin_edges": edges, "chosen": longer, "rejected": longer},
            "pair_histogram": {"longer_bin_edges": edges, "longer": longer,
                               "tokens_bin_edges": [2 * e for e in edges], "tokens": tokens}}


def test_length_stats_is_read_at_load_and_drives_the_estimate(tmp_path):
    stats = tmp_path / "orca_stats.json"
    stats.write_text(json.dumps(_stats()))
    plan = plan_recipe(GUIDE, [f"training.length_stats={stats}"])
    source = plan.source_of("estimate.lengths")
    assert source.source.startswith("user") and str(stats) in source.why
    assert plan.estimate["lengths"]["kind"] == "histogram" and plan.estimate["lengths"]["longest"] == 190
    padding = plan.estimate["padding"]
    assert 128 < padding["mean_padded_tokens"] < 192 and padding["longest_tokens"] == 190
    full = plan_recipe(GUIDE, ["~training.length_stats"]).estimate
    assert plan.estimate["throughput"]["samples_per_s"] > 5 * full["throughput"]["samples_per_s"]


def test_length_stats_problems_name_the_field_or_the_file(dpoc_cli, tmp_path):
    result = dpoc_cli("build", GUIDE, f"training.length_stats={tmp_path}/none.json", "-o", tmp_path / "o")
    assert result.code == 2 and "Traceback" not in result.err
    assert f"{GUIDE}: training.length_stats: cannot read {tmp_path}/none.json: No such file or directory" in result.err
    old = tmp_path / "old_stats.json"
    old.write_text(json.dumps({k: v for k, v in _stats().items() if k != "pair_histogram"}))
    result = dpoc_cli("build", GUIDE, f"training.length_stats={old}", "-o", tmp_path / "p")
    assert result.code == 2
    assert f"{old}: pair_histogram: missing: the per-pair histograms (longer side, pair tokens) (valid: the " \
           "{prefix}_stats.json that dpoc preprocess writes; re-run the build's preprocess.sh if it is older)" in result.err
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()
    both = dpoc_cli("build", GUIDE, f"training.length_stats={tmp_path}/x.json", "training.mean_seq_length=500",
                    "-o", tmp_path / "q")
    assert both.code == 2


def test_the_may_not_fit_warning_points_at_length_stats(dpoc_cli, tmp_path):
    result = dpoc_cli("build", GUIDE, "~training.length_stats", "-o", tmp_path / "o")
    assert "set training.length_stats to the dataset's _stats.json (preprocess.sh writes it)" in result.err
    assert "mean_seq_length" not in result.err
