"""The throughput model's latency term: the fixed cost of every kernel call and the optimizer step, counted by
hand on the toy (conftest.model: dense, 2 layers, no q/k norms, untied).

Calls of one layer's forward: attention 7 (input norm, QKV, rotary x2, core attention, output projection,
residual add) + MLP 5 (norm, gate/up, SwiGLU, down, residual add) = 12. One stage holding everything: 2 x 12
+ embedding 1 + head 12 (final norm, output projection, cross entropy 10) = 37 per forward, 52 with the DPO
loss. A live-reference training micro-batch: policy forward 52 + backward 52 (one autograd node a call) +
reference forward 37 = 141. Parameter tensors: 6 per layer (2 norms, QKV, output projection, gate/up, down) +
embedding, final norm, head = 15, each costing the optimizer step `optimizer_tensor_us`.
"""

from __future__ import annotations

import pytest

from dpoc.compiler.pipeline import plan_recipe
from dpoc.contract.specs import preset_hardware
from dpoc.planner.lengths import MeanLength
from dpoc.planner.throughput import Efficiency, predict, predict_reference_pass
from dpoc.planner.workload import DPO_PRECOMPUTED
from tests.conftest import RECIPES

US = 1e-6
TOY_PARAMS = 1704


def _predict(specs, hw, lay, workload=None, layers=2):
    extra = {} if workload is None else {"workload": workload}
    return predict(specs.model(num_layers=layers), hw, lay, specs.training(), Efficiency(1, 1), MeanLength(4),
                   **extra)


def _calls_only(specs, devices=1, **overrides):
    """1 us a call, 10 us an optimizer tensor (unless overridden); FLOPs and links effectively free."""
    return specs.hardware(**{"devices_per_node": devices, "peak_tflops": 1e12, "intra_node_gbps": 1e12,
                             "op_latency_us": 1.0, "optimizer_tensor_us": 10.0, **overrides})


def test_zero_latency_and_unbounded_memory_add_nothing(specs):
    t = _predict(specs, specs.hardware(devices_per_node=1, peak_tflops=1e-6), specs.layout(1, gbs=2))
    assert t.latency_s == 0 and t.optimizer_s == 0
    assert t.step_s == pytest.approx(2 * t.compute_s)


def test_calls_of_a_live_step_counted_by_hand(specs):
    t = _predict(specs, _calls_only(specs), specs.layout(1, gbs=2))
    assert t.latency_s == pytest.approx(141 * US)
    assert t.optimizer_s == pytest.approx(15 * 10 * US)
    assert t.step_s == pytest.approx(2 * 141 * US + 150 * US, rel=1e-6)
    assert t.shares()["latency"] + t.shares()["optimizer"] == pytest.approx(1, rel=1e-6)
    assert sum(t.shares().values()) == pytest.approx(1)


def test_precomputed_reference_drops_its_forward_calls(specs):
    t = _predict(specs, _calls_only(specs), specs.layout(1, gbs=2), DPO_PRECOMPUTED)
    assert t.latency_s == pytest.approx((141 - 37) * US)


def test_recompute_adds_the_recomputed_calls(specs):
    full = specs.layout(1, gbs=2, recompute="full", recompute_method="uniform", recompute_num_layers=1)
    assert _predict(specs, _calls_only(specs), full).latency_s == pytest.approx((141 + 2 * 12) * US)
    selective = specs.layout(1, gbs=2, recompute="selective")
    assert _predict(specs, _calls_only(specs), selective).latency_s == pytest.approx((141 + 2) * US)


def test_latency_grows_with_layers_and_micro_batches(specs):
    hw = _calls_only(specs)
    two, four = _predict(specs, hw, specs.layout(1, gbs=2)), _predict(specs, hw, specs.layout(1, layers=4, gbs=2),
                                                                    layers=4)
    # 2 more layers: 2 x 12 calls in each of 3 passes (policy forward and backward, reference forward), and
    # their 2 x 6 tensors in the optimizer
    assert four.latency_s - two.latency_s == pytest.approx(2 * 12 * 3 * US)
    assert four.optimizer_s - two.optimizer_s == pytest.approx(2 * 6 * 10 * US)
    doubled = _predict(specs, hw, specs.layout(1, gbs=4))
    assert doubled.micro_batches == 2 * two.micro_batches
    assert doubled.step_s - doubled.optimizer_s == pytest.approx(2 * (two.step_s - two.optimizer_s))


def test_the_last_pipeline_stage_pays_the_head_and_loss(specs):
    # pp 2: stage 0 holds the embedding and a layer (13 calls a forward), stage 1 a layer and the head
    # (24, 39 with the loss): 2 x 39 + 24 = 102 calls a micro-batch there
    t = _predict(specs, _calls_only(specs, 2), specs.layout(2, pp=2, gbs=4))
    assert t.latency_s == pytest.approx(102 * US)


def test_the_distributed_optimizer_updates_its_shard(specs):
    def slow_memory(devices):  # 1000 bytes/s, calls free
        return _calls_only(specs, devices, op_latency_us=0.0, optimizer_tensor_us=0.0, memory_gbps=1e-6)

    one = _predict(specs, slow_memory(1), specs.layout(1, gbs=2))
    assert one.optimizer_s == pytest.approx(TOY_PARAMS * 40 / 1e3)
    two = _predict(specs, slow_memory(2), specs.layout(2, gbs=2))
    assert two.optimizer_s == pytest.approx(TOY_PARAMS * 40 / 1e3 / 2)
    calls = _predict(specs, _calls_only(specs, 2), specs.layout(2, gbs=2))
    assert calls.optimizer_s == pytest.approx(15 / 2 * 10 * US)


def test_the_precompute_pass_pays_forward_calls_only(specs):
    hw = _calls_only(specs)
    lay = specs.layout(1, gbs=2)
    ref = predict_reference_pass(specs.model(), hw, lay, specs.training(), Efficiency(1, 1), MeanLength(4),
                                 micro_batch=1, round_micro_batches=4)
    assert ref.pairs_per_s == pytest.approx(1 / (37 * US), rel=1e-6)


def test_presets_carry_the_constants_with_provenance():
    plan = plan_recipe(RECIPES / "tiny_cpu.yaml")
    cpu = preset_hardware("cpu")
    assert plan.hardware.op_latency_us == cpu.op_latency_us > 0
    assert plan.hardware.memory_gbps == cpu.memory_gbps
    assert plan.hardware.optimizer_tensor_us == cpu.optimizer_tensor_us > 0
    for key in ("op_latency_us", "optimizer_tensor_us", "memory_gbps"):
        assert plan.source_of(f"hardware.{key}").source == "preset:cpu"
    shares = plan.estimate["throughput"]["step_shares"]
    assert set(shares) == {"compute", "latency", "communication", "optimizer", "bubble"}
    assert shares["latency"] > 0
    for name in ("atlas-a2", "atlas-a3"):
        atlas = preset_hardware(name)
        assert (atlas.op_latency_us, atlas.optimizer_tensor_us, atlas.memory_gbps) == (2.8, 6, 1055)
