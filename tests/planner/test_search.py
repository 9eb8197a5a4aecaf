"""The layout search with the compiler's `make_layout` and rules: enumeration, memory fit, ranking, pinning;
and the layouts MindSpeed ships, pinned."""

from __future__ import annotations

import pytest

from dpoc.contract.specs import preset_hardware, preset_model
from dpoc.planner.layout import make_layout
from dpoc.planner.lengths import MeanLength
from dpoc.planner.memory import GIB, estimate_memory
from dpoc.planner.search import balanced_layer_list, search, smallest_fitting_nodes
from dpoc.planner.throughput import Efficiency

EFF = Efficiency(0.5, 0.2)


def _search(specs, m, hw, training=None, gbs=8, mean=4, **kwargs):
    training = training or specs.training()
    return search(m, hw, training, lambda k: make_layout(m, hw, gbs, k), specs.compiler_rules(m, hw, training),
                  EFF, MeanLength(mean), **kwargs)


def _toy_search(specs, hw, **kwargs):
    """The toy with 4 heads of 2 in 2 KV groups: conftest.model's weight shapes, but tp 2 divides the KV heads."""
    return _search(specs, specs.model(num_attention_heads=4, num_query_groups=2, head_dim=2), hw, **kwargs)


def test_balanced_layer_lists():
    assert balanced_layer_list(94, 4) == (23, 24, 24, 23)  # 94 = 4 * 23 + 2: two middle stages get 24
    assert balanced_layer_list(94, 8) == (11, 12, 12, 12, 12, 12, 12, 11)  # 94 = 8 * 11 + 6
    assert balanced_layer_list(48, 8) == (6,) * 8


def test_search_enumerates_validates_and_ranks(specs):
    # 4 devices, 2-layer toy: tp {1, 2, 4} x pp {1, 2}; tp 4 x pp 2 does not tile 4 devices and is not
    # generated. pp 1: 3 grids; pp 2 (tp 1, 2) with vpp {1, 2, 4}: 6 -> 9 x mbs {1, 2} x recompute
    # {none, full} = 36 layouts. The rules reject tp 4 (2 KV groups; 4 layouts) and vpp > 1 (one layer per
    # stage; 2 x 2 x 4 = 16); 16 remain.
    result = _toy_search(specs, specs.hardware(devices_per_node=4))
    assert result.evaluated == 36
    assert result.rule_rejected == 20
    assert len(result.ranked) == 16 and not result.too_big
    rates = [c.throughput.samples_per_s for c in result.ranked]
    assert rates == sorted(rates, reverse=True)
    assert all(c.memory.fits and c.accepted for c in result.ranked)
    assert {(c.layout.tp, c.layout.pp) for c in result.ranked} == {(1, 1), (1, 2), (2, 1), (2, 2)}


def test_pinned_knobs_are_kept(specs):
    result = _toy_search(specs, specs.hardware(devices_per_node=4), pinned={"tp": 2, "recompute": "full"})
    assert result.evaluated == 8  # pp 1 | pp 2 x vpp {1, 2, 4}, x mbs {1, 2}
    assert {(c.layout.tp, c.layout.recompute) for c in result.ranked} == {(2, "full")}


def test_a_pinned_grid_that_does_not_tile_goes_to_the_rules(specs):
    result = _toy_search(specs, specs.hardware(devices_per_node=4), pinned={"tp": 4, "pp": 2, "cp": 1})
    # vpp {1, 2, 4} x mbs {1, 2} x recompute {none, full}
    assert result.evaluated == result.rule_rejected == 12
    assert not result.ranked


def test_layouts_over_memory_are_reported_smallest_first(specs):
    result = _toy_search(specs, specs.hardware(devices_per_node=4, memory_gib=1e-6))  # 1074 bytes
    assert not result.ranked and result.best is None
    peaks = [c.memory.peak.total for c in result.too_big]
    assert len(peaks) == 5 and peaks == sorted(peaks)
    assert result.too_big[0].problems[0].startswith("stage ")


def test_uneven_pipeline_gets_a_layer_list(specs):
    result = _search(specs, specs.model(num_layers=3), specs.hardware(devices_per_node=2),
                     pinned={"pp": 2, "tp": 1})
    # 3 layers on 2 stages: a (2, 1) layer list (vpp 1 only: MindSpeed rejects a list with vpp), or one
    # no-op layer (index 3) making 2 + 2, also interleaved as vpp 2
    assert {(c.layout.stage_layers, c.layout.noop_layers, c.layout.vpp) for c in result.ranked} == {
        ((2, 1), (), 1), ((2, 2), (3,), 1), ((2, 2), (3,), 2)}


def test_mindspeed_qwen3_30b_layout_is_found_on_a3(specs):
    """MindSpeed-RL's Qwen3-30B-A3B DPO layout (TP2 PP8 EP1, 2 x 16 dies, GBS 64, dynamic padding) fits."""
    training = specs.training(4096, dynamic_padding=True)
    result = _search(specs, preset_model("qwen3-30b-a3b"), preset_hardware("atlas-a3", 2), training, gbs=64,
                     mean=500)
    found = {(c.layout.tp, c.layout.pp, c.layout.ep, c.layout.etp, c.layout.vpp, c.layout.micro_batch_size,
              c.layout.recompute) for c in result.ranked}
    assert (2, 8, 1, 2, 1, 1, "none") in found
    assert result.best.memory.fits


def test_smallest_fitting_nodes(specs):
    m = specs.model()
    one = specs.hardware(devices_per_node=1)
    # capacity one byte short of the single-device layout (no recompute, 1 pair per micro-batch, pinned);
    # on two devices dp 2 halves the optimizer state and fits
    pinned = {"recompute": "none", "micro_batch_size": 1}
    single = estimate_memory(m, one, specs.layout(1, gbs=8), specs.training()).peak.total
    hw = specs.hardware(devices_per_node=1, memory_gib=(single - 1) / GIB)

    def prepare(h):
        return (lambda k: make_layout(m, h, 8, k)), specs.compiler_rules(m, h, specs.training())

    assert smallest_fitting_nodes(m, hw, specs.training(), prepare, EFF, MeanLength(4), pinned) == 2
    assert smallest_fitting_nodes(m, specs.hardware(devices_per_node=1, memory_gib=1e-7), specs.training(),
                                  prepare, EFF, MeanLength(4), max_nodes=4) is None


def test_noop_padding_follows_mindspeed_for_94_layers(specs):
    # Qwen3-235B's 94 layers on pp 4 x vpp 2: padded to 96 with no-op layers 94 and 95 (MindSpeed's script);
    # the balanced layer list (23, 24, 24, 23) is tried too, and the rules reject it with vpp
    result = _search(specs, specs.model(num_layers=94), specs.hardware(devices_per_node=4),
                     pinned={"tp": 1, "pp": 4, "vpp": 2, "micro_batch_size": 1, "recompute": "none"})
    assert result.evaluated == 2 and result.rule_rejected == 1
    (padded,) = result.ranked
    assert padded.layout.noop_layers == (94, 95)
    # the last stage runs virtual chunks 3 and 7 of 12 layers: 36-47 and 84-95, of which 94, 95 are no-ops
    assert padded.memory.stages[-1].layers == 22


FULL_RECOMPUTE = {"recompute": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
# mindspeed-dpo-facts §4, §11, §13. Qwen3-235B: the converter example's TP1 PP4 EP32 with 8 layers per virtual
# pipeline stage on 94 + 2 no-op layers: 96 / pp 4 = 24 layers per stage / 8 = vpp 3. The source gives no
# recompute; DPO (policy + reference, 4 sequences per micro-batch) needs full recompute in this memory model.
MINDSPEED_LAYOUTS = [
    ("qwen3-30b-a3b", "atlas-a3", 2, 64, {"tp": 2, "pp": 8, "ep": 1}),
    ("qwen3-30b-a3b", "atlas-a2", 2, 64, {"tp": 2, "pp": 8, "ep": 1}),
    ("qwen3-235b-a22b", "atlas-a3", 16, 256,
     {"tp": 1, "pp": 4, "ep": 32, "vpp": 3, "noop_layers": (94, 95), **FULL_RECOMPUTE}),
]


@pytest.mark.parametrize(("model", "hardware", "nodes", "gbs", "knobs"), MINDSPEED_LAYOUTS)
def test_mindspeed_layouts_pass_the_rules_and_fit_when_pinned(specs, model, hardware, nodes, gbs, knobs):
    m, hw = preset_model(model), preset_hardware(hardware, nodes)
    training = specs.training(4096, dynamic_padding=True)
    layout = make_layout(m, hw, gbs, knobs)
    assert specs.compiler_rules(m, hw, training)(layout) == []
    assert estimate_memory(m, hw, layout, training, MeanLength(500)).fits
    pinned = {"cp": 1, "etp": layout.etp, "vpp": layout.vpp, "micro_batch_size": 1, "recompute": "none", **knobs}
    result = _search(specs, m, hw, training, gbs=gbs, mean=500, pinned=pinned)
    assert result.evaluated == 1 and result.best.layout == layout


def test_qwen3_235b_mindspeed_layout_needs_16_a3_nodes(specs):
    """The layout's grid (etp·ep·pp = 128) tiles 8 nodes, but with edp 1 the routed experts' optimizer states are
    not sharded: over 64 GiB there, within it on 16 nodes (edp 2)."""
    m = preset_model("qwen3-235b-a22b")
    *_, knobs = MINDSPEED_LAYOUTS[-1]
    training = specs.training(4096, dynamic_padding=True)
    hw = preset_hardware("atlas-a3", 8)
    layout = make_layout(m, hw, 256, knobs)
    assert (layout.world_size, layout.edp, layout.stage_layers) == (128, 1, (24, 24, 24, 24))
    assert specs.compiler_rules(m, hw, training)(layout) == []
    assert not estimate_memory(m, hw, layout, training, MeanLength(500)).fits  # 16 nodes: the parametrized test above
