"""Context parallelism in the planner against hand counts: its exchange buffers in memory, and its exchange
time (ring: hidden behind the attention core where that is longer; Ulysses' all-to-alls: exposed).

Toy dense model (conftest.model): q 8, kv 4, 2 layers; seq 4, one pair per micro-batch, cp 2 on 2 devices: a
rank holds 4 * 2 / 2 = 4 tokens, bf16: 8 bytes per unit of width.
"""

from __future__ import annotations

import pytest

from dpoc.planner.lengths import MeanLength
from dpoc.planner.memory import estimate_memory, exchange_bytes, layer_activation_bytes
from dpoc.planner.throughput import COMM_EFFICIENCY, Efficiency, predict

EFF = Efficiency(0.5, 0.5)


def test_exchange_buffers(specs):
    m, train = specs.model(), specs.training()
    ring, ulysses = specs.layout(2, cp=2), specs.layout(2, cp=2, cp_algo="ulysses")
    assert exchange_bytes(m, specs.layout(1), train, 2) == 0
    assert exchange_bytes(m, ring, train, 2) == 4 * 8 * 2 * 4  # 4 blocks of k + v
    assert exchange_bytes(m, ulysses, train, 2) == 8 * (8 + 2 * 4)  # q, k, v regrouped by heads
    # activations are split over cp: half the tokens of cp 1
    assert layer_activation_bytes(m, ring, train, 2) == layer_activation_bytes(m, specs.layout(1), train, 2) / 2
    (stage,) = estimate_memory(m, specs.hardware(devices_per_node=2), ring, train).stages
    # the reference's layer forward (864 > logits 4 * 32 * 6 = 768) plus the ring's buffers
    assert stage.transient == 864 + 256


LATENCY_S = 10e-6  # the test hardware's collective_latency_us


def _communication(specs, lay, **hw):
    hardware = specs.hardware(devices_per_node=2, **hw)
    return predict(specs.model(), hardware, lay, specs.training(), EFF, MeanLength(4)).communication_s


def test_ring_exchange_is_exposed_only_beyond_the_attention_core(specs):
    # live reference, no recompute: 3 passes; (3 + 1) passes x 2 layers x (cp - 1) = 8 blocks of 8 * 2 * 4 = 64 B
    ring = specs.layout(2, cp=2)
    slow_link_fast_chip = _communication(specs, ring, intra_node_gbps=1e-6, peak_tflops=1e12)
    assert slow_link_fast_chip == pytest.approx(8 * 64 / (1e-6 * 1e9 * COMM_EFFICIENCY) + 8 * LATENCY_S,
                                                rel=1e-6)
    # a chip so slow that the attention core outlasts the exchange hides it whole
    assert _communication(specs, ring, peak_tflops=1e-9) == 0.0


def test_ulysses_all_to_alls_are_exposed(specs):
    # 3 passes x 2 layers x 2 all-to-alls = 12; 3 x 2 x 8 B x (2 * 8 + 2 * 4) x (cp - 1) / cp = 576 B
    ulysses = specs.layout(2, cp=2, cp_algo="ulysses")
    assert _communication(specs, ulysses, intra_node_gbps=1e-6, peak_tflops=1e-9) == pytest.approx(
        576 / (1e-6 * 1e9 * COMM_EFFICIENCY) + 12 * LATENCY_S, rel=1e-6)
