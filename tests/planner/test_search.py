"""The layout search: enumeration, the compiler's rules as a callable, memory fit, ranking, pinning."""

from __future__ import annotations

from dpoc.planner.memory import GIB, estimate_memory
from dpoc.planner.search import balanced_layer_list, search, smallest_fitting_nodes
from dpoc.planner.throughput import Efficiency

EFF = Efficiency(0.5, 0.2)


def toy_rules(layout):
    """Stand-in for the compiler's rules: the dense grid and no interleaving."""
    problems = []
    if layout.tp * layout.pp * layout.cp > layout.world_size:
        problems.append(f"tp*pp*cp {layout.tp * layout.pp * layout.cp} > world {layout.world_size}")
    if layout.vpp > 1:
        problems.append("vpp")
    return problems


def _toy_search(specs, hw, **kwargs):
    m = specs.model()
    return search(m, hw, specs.training(), lambda k: specs.build(m, hw, 8, k), toy_rules, EFF, 4, **kwargs)


def test_balanced_layer_lists():
    assert balanced_layer_list(94, 4) == (23, 24, 24, 23)  # 94 = 4 * 23 + 2: two middle stages get 24
    assert balanced_layer_list(94, 8) == (11, 12, 12, 12, 12, 12, 12, 11)  # 94 = 8 * 11 + 6
    assert balanced_layer_list(48, 8) == (6,) * 8


def test_search_enumerates_validates_and_ranks(specs):
    # 4 devices, 2-layer toy: tp {1, 2, 4} x pp {1, 2}; tp 4 x pp 2 does not tile 4 devices and is not
    # generated. pp 1: 3 grids; pp 2 (tp 1, 2) with vpp {1, 2, 4}: 6 -> 9 x mbs {1, 2} x recompute
    # {none, full} = 36 layouts. The rules reject vpp > 1 (2 x 2 x 4 = 16); 20 remain.
    result = _toy_search(specs, specs.hardware(devices_per_node=4))
    assert result.evaluated == 36
    assert result.rule_rejected == 16
    assert len(result.ranked) == 20 and not result.too_big
    rates = [c.throughput.samples_per_s for c in result.ranked]
    assert rates == sorted(rates, reverse=True)
    assert all(c.memory.fits and c.accepted for c in result.ranked)
    assert {(c.layout.tp, c.layout.pp) for c in result.ranked} == {(1, 1), (1, 2), (2, 1), (2, 2), (4, 1)}


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
    m = specs.model(num_layers=3)
    hw = specs.hardware(devices_per_node=2)
    result = search(m, hw, specs.training(), lambda k: specs.build(m, hw, 8, k), toy_rules, EFF, 4,
                    pinned={"pp": 2, "tp": 1})
    # 3 layers on 2 stages: a (2, 1) layer list, or one no-op layer (index 3) making 2 + 2
    assert {(c.layout.stage_layers, c.layout.noop_layers) for c in result.ranked} == {((2, 1), ()),
                                                                                       ((2, 2), (3,))}


def test_mindspeed_qwen3_30b_layout_is_found_on_a3(specs):
    """MindSpeed-RL's Qwen3-30B-A3B DPO layout (TP2 PP8 EP1, 2 x 16 dies, GBS 64, dynamic padding) fits."""
    m = specs.qwen3_30b_a3b()
    hw = specs.hardware(devices_per_node=16, nodes=2, hccl_buffsize_mb=256, reserved_gib=4.9)
    world = hw.world_size

    def rules(layout):  # the grids, heads, experts and batch rules the compiler applies
        bad = world % (layout.tp * layout.pp * layout.cp) or world % (layout.etp * layout.ep * layout.pp)
        bad = bad or 4 % layout.tp or 128 % layout.ep or 64 % (layout.micro_batch_size * layout.dp)
        bad = bad or (layout.vpp > 1 and layout.stage_layers[0] % layout.vpp)
        return ["invalid"] if bad else []

    training = specs.training(4096, dynamic_padding=True)
    result = search(m, hw, training, lambda k: specs.build(m, hw, 64, k), rules, EFF, 500)
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
        return (lambda k: specs.build(m, h, 8, k)), toy_rules

    assert smallest_fitting_nodes(m, hw, specs.training(), prepare, EFF, 4, pinned) == 2
    assert smallest_fitting_nodes(m, specs.hardware(devices_per_node=1, memory_gib=1e-7), specs.training(),
                                  prepare, EFF, 4, max_nodes=4) is None


def test_noop_padding_follows_mindspeed_for_94_layers(specs):
    # Qwen3-235B's 94 layers on pp 4 x vpp 2: padded to 96 with no-op layers 94 and 95 (MindSpeed's script)
    m = specs.model(num_layers=94)
    hw = specs.hardware(devices_per_node=4)
    result = search(m, hw, specs.training(), lambda k: specs.build(m, hw, 8, k), lambda lay: [], EFF, 4,
                    pinned={"tp": 1, "pp": 4, "vpp": 2, "micro_batch_size": 1, "recompute": "none"})
    assert {c.layout.noop_layers for c in result.ranked} == {(), (94, 95)}
    padded = next(c for c in result.ranked if c.layout.noop_layers)
    # the last stage runs virtual chunks 3 and 7 of 12 layers: 36-47 and 84-95, of which 94, 95 are no-ops
    assert padded.memory.stages[-1].layers == 22
