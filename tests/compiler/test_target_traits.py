"""Each target's batching and memory features reach the plan and the rendered config: MindSpeed-RL's
`reuse_fp32_param` and `swap_attention`, which the dpoc runtime refuses; the guide's stated length assumption."""

from __future__ import annotations

import json

import yaml

from dpoc.contract.resources import preset_dir
from dpoc.planner.calibration import assumed_orca_stats
from tests.conftest import RECIPES

GUIDE, A2 = RECIPES / "qwen3_30b.yaml", RECIPES / "qwen3_30b_a2.yaml"


def test_the_length_preset_is_the_bench_assumption():
    """dpoc/presets/lengths/orca-dpo-pairs-assumed.json is calibration.assumed_orca_stats(), not hand-edited."""
    shipped = json.loads((preset_dir("lengths") / "orca-dpo-pairs-assumed.json").read_text())
    assert shipped == assumed_orca_stats()
    assert shipped["longest"]["chosen"] == 2924  # exp(mu + 0.5 z), z the 1 - 1/12860 normal quantile


def test_an_unknown_length_preset_names_the_valid_ones(dpoc_cli, tmp_path):
    result = dpoc_cli("build", GUIDE, "training.length_stats=preset:orca", "-o", tmp_path / "o")
    assert result.code == 2 and "Traceback" not in result.err
    assert ("training.length_stats: unknown length preset 'orca' (valid: preset:orca-dpo-pairs-assumed, or a "
            "_stats.json path)") in result.err
    assert not (tmp_path / "o").exists()


def test_mindspeed_target_plans_its_batching_and_features(dpoc_cli, tmp_path):
    result = dpoc_cli("build", GUIDE, "runtime=mindspeed-rl", "-o", tmp_path / "o")
    assert result.code == 0 and "warning" not in result.err, result.err
    plan = json.loads((tmp_path / "o/plan.json").read_text())
    assert plan["estimate"]["target"] == {"name": "mindspeed-rl", "batching": "global-batch",
                                          "reuse_fp32_param": True, "flash_stats_fp32_per_head": 16,
                                          "response_head": False}
    # every micro-batch at the expected longest of 64 pairs (rounded up to 8: + 3.5 on average); memory at the
    # dataset's longest, 2924 rounded up to 8
    padding = plan["estimate"]["padding"]
    assert 1400 < padding["mean_padded_tokens"] < 1500  # sort-and-cut: about 500
    assert padding["longest_tokens"] == 2928
    config = yaml.safe_load((tmp_path / "o/mindspeed-rl/dpo_o.yaml").read_text())["megatron_training"]
    assert config["reuse_fp32_param"] is True and "swap_attention" not in config


def test_the_a2_guide_needs_swap_attention_under_mindspeed(dpoc_cli, tmp_path):
    """As the guide's A2 config: without swap attention stage 0 does not fit at DP 1; with it, it does."""
    without = dpoc_cli("build", A2, "runtime=mindspeed-rl", "-o", tmp_path / "a")
    assert "warning: parallelism: does not fit: pipeline stage 0 needs up to 65.4 GiB" in without.err
    swap = dpoc_cli("build", A2, "runtime=mindspeed-rl", "parallelism.swap_attention=true", "-o", tmp_path / "b")
    assert swap.code == 0 and "warning" not in swap.err, swap.err
    config = yaml.safe_load((tmp_path / "b/mindspeed-rl/dpo_b.yaml").read_text())["megatron_training"]
    assert config["swap_attention"] is True
    refused = dpoc_cli("build", A2, "parallelism.swap_attention=true", "-o", tmp_path / "c")
    assert refused.code == 2
    assert ("parallelism.swap_attention: is a MindSpeed feature the dpoc runtime (megatron-core, local layers) does "
            "not have; valid: false, or runtime=mindspeed-rl") in refused.err


def test_plan_shows_the_same_job_under_both_targets(dpoc_cli):
    """MindSpeed-RL pads every micro-batch to the longest of its 64-pair global batch (about 1450 tokens under
    the orca assumption), the dpoc runtime each to its own longest (about 510): the same layout, fewer pairs/s
    and more memory under MindSpeed-RL despite its fp32 reuse."""
    data = json.loads(dpoc_cli("plan", GUIDE, "--json", "--top", "1").out)["targets"]
    dpoc, mindspeed = data["dpoc"], data["mindspeed-rl"]
    assert dpoc["knobs"] == mindspeed["knobs"]
    assert (dpoc["target"]["batching"], mindspeed["target"]["batching"]) == ("sort-and-cut", "global-batch")
    assert mindspeed["throughput"]["samples_per_s"] < dpoc["throughput"]["samples_per_s"] / 2
    assert dpoc["memory"]["fits"] and mindspeed["memory"]["fits"]
    table = dpoc_cli("plan", GUIDE, "--top", "1").out
    assert "Target dpoc (sort-and-cut batching): tp=2 pp=8" in table
    assert "Target mindspeed-rl (global-batch batching): tp=2 pp=8" in table


NODES4 = ["hardware.nodes=4", "hardware.hosts=[10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4]"]


def _mindspeed_training(build_dir) -> dict:
    """The megatron_training section, checked as the guide build's is: MegatronConfig fields, scalars only."""
    from tests.compiler.test_build import MINDSPEED_FIELDS

    train = yaml.safe_load((build_dir / f"mindspeed-rl/dpo_{build_dir.name}.yaml").read_text())["megatron_training"]
    assert set(train) - {"model"} <= MINDSPEED_FIELDS, set(train) - MINDSPEED_FIELDS
    assert all(not isinstance(v, list | dict) for v in train.values())
    return train


def test_mindspeed_renders_context_parallelism_and_its_algorithm(dpoc_cli, tmp_path):
    for algo, theirs in (("ring", "megatron_cp_algo"), ("ulysses", "ulysses_cp_algo")):
        out = tmp_path / algo
        result = dpoc_cli("build", GUIDE, "runtime=mindspeed-rl", "parallelism.cp=2", f"parallelism.cp_algo={algo}",
                          "-o", out)
        assert result.code == 0, result.err
        train = _mindspeed_training(out)
        assert (train["context_parallel_size"], train["context_parallel_algo"]) == (2, theirs)
        assert train["no_pad_to_seq_lengths"] is True  # MindSpeed-LLM then sets variable_seq_lengths for pp 8
    train = _mindspeed_training(_built(dpoc_cli, tmp_path / "nocp"))
    assert train["context_parallel_size"] == 1 and "context_parallel_algo" not in train


def _built(dpoc_cli, out):
    assert dpoc_cli("build", GUIDE, "runtime=mindspeed-rl", "-o", out).code == 0
    return out


def test_ring_with_dynamic_padding_needs_batches_divisible_by_2cp(dpoc_cli, tmp_path):
    """tp 1, cp 8: MindSpeed-RL pads a batch to a multiple of lcm(8, 8) = 8; ring splits it into 16 chunks."""
    ring = ["runtime=mindspeed-rl", *NODES4, "parallelism.cp=8", "parallelism.tp=1", "parallelism.etp=1"]
    result = dpoc_cli("build", GUIDE, *ring, "-o", tmp_path / "o")
    assert result.code == 2 and "Traceback" not in result.err
    assert result.err.strip().splitlines()[-1] == (
        f"{GUIDE}: parallelism.cp_algo: ring: MindSpeed's ring attention splits each sequence into 2·cp = 16 "
        "chunks, but with dynamic padding MindSpeed-RL pads a batch only to a multiple of lcm(8, tp·cp) = 8; valid: "
        "cp_algo=ulysses, cp <= 4 or an even tp, or training.dynamic_padding=false")
    assert not (tmp_path / "o").exists()
    assert dpoc_cli("build", GUIDE, *ring, "parallelism.cp_algo=ulysses", "-o", tmp_path / "u").code == 0
    assert dpoc_cli("build", GUIDE, *ring, "training.dynamic_padding=false", "-o", tmp_path / "s").code == 0


def test_the_dpoc_runtime_refuses_ulysses(dpoc_cli, tmp_path):
    result = dpoc_cli("build", RECIPES / "tiny_cpu.yaml", "parallelism.cp_algo=ulysses", "-o", tmp_path / "o")
    assert result.code == 2
    assert ("parallelism.cp_algo: ulysses: the dpoc runtime (megatron-core, local layers) runs ring context "
            "parallelism only; valid: ring, or runtime=mindspeed-rl") in result.err


def test_the_auto_layout_chooses_context_parallelism_for_long_sequences(dpoc_cli):
    """32K-token pairs on the guide's 32 dies: without cp every in-flight micro-batch holds 32K tokens of
    activations per rank; the fastest layout that fits splits the sequence."""
    result = dpoc_cli("plan", GUIDE, "runtime=mindspeed-rl", "parallelism=auto", "training.seq_length=32768",
                      "~training.length_stats", "--json", "--top", "1")
    best = json.loads(result.out)["ranked"][0]["knobs"]
    assert best["cp"] > 1, best
