"""Plain-data and text forms of planner results."""

from __future__ import annotations

from dpoc.planner.features import MemoryFeatures, Traits
from dpoc.planner.layout import make_layout
from dpoc.planner.lengths import MeanLength
from dpoc.planner.memory import estimate_memory
from dpoc.planner.report import explain, knob_text, memory_summary, summary_traits, traits_summary
from dpoc.planner.search import search
from dpoc.planner.throughput import Efficiency


def test_memory_summary_in_gib(specs):
    est = estimate_memory(specs.model(), specs.hardware(), specs.layout(1), specs.training())
    summary = memory_summary(est)
    assert summary["capacity_gib"] == 64.0 and summary["fits"] and summary["peak_stage"] == 0
    (stage,) = summary["stages"]
    assert stage["params"] == 1704
    assert stage["weights_gib"] == round(2 * 1704 / 2**30, 3) == 0.0
    assert set(stage) >= {"optimizer_gib", "reference_gib", "activations_gib", "reserve_gib", "total_gib"}


def test_knob_text_orders_and_skips_empty():
    knobs = {"recompute": "none", "tp": 2, "pp": 4, "noop_layers": (), "num_layer_list": (23, 24, 24, 23)}
    assert knob_text(knobs) == "tp=2 pp=4 recompute=none num_layer_list=23,24,24,23"


def test_explain_names_counts_winner_and_nearest_rejections(specs):
    m = specs.model()
    # 25,000 bytes: dp 2 with no recompute (18,744 static + 6,976 dynamic) is over, sharded layouts fit
    hw = specs.hardware(devices_per_node=2, memory_gib=25_000 / 2**30)
    training = specs.training()
    result = search(m, hw, training, lambda k: make_layout(m, hw, 8, k), specs.compiler_rules(m, hw, training),
                    Efficiency(0.5, 0.5), MeanLength(4))
    lines = explain(result, top=2)
    # 2 devices: tp 1 or 2 at pp 1 (x mbs {1, 2} x recompute {none, full} = 8), pp 2 x vpp {1, 2, 4} (12) = 20;
    # the rules reject tp 2 (one KV group; 4) and vpp > 1 with one layer per stage (8)
    assert lines[0] == f"20 layouts tried: 12 break a rule, {result.over_memory} do not fit, {len(result.ranked)} fit"
    assert result.over_memory > 0 and result.ranked
    assert lines[1].startswith("1. tp=") and "pairs/s" in lines[1]
    assert lines[3].startswith("over memory: ") and "GiB of 0 GiB" in lines[3]


def test_a_plans_target_summary_reads_back_as_the_traits_it_was_written_from():
    """plan.json's estimate.target is what the device check plans its one layer with: nothing may be lost."""
    traits = Traits("mindspeed-rl", "global-batch", MemoryFeatures(reuse_fp32_param=True, flash_stats=16),
                    response_head=False)
    assert summary_traits(traits_summary(traits)) == traits
