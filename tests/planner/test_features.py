"""Each target's memory features and batching against hand counts (`dpoc/planner/features.py`).

Toy dense model (conftest.model): h 8, 2 heads x 4 = q 8, 1 KV group (kv 4), FFN 16, vocab 32; at seq 4 with
one pair per micro-batch a layer sees 2 x 4 = 8 tokens (tp 1: full = local = 8), bf16 (a = 2 B).
"""

from __future__ import annotations

import math
import random

import pytest

from dpoc.planner.features import DPOC_CPU, GLOBAL_BATCH, MemoryFeatures, Traits
from dpoc.planner.lengths import Histogram, LengthStats
from dpoc.planner.memory import GIB, estimate_memory, flash_stats_bytes, layer_activation_bytes, swapped_bytes

HIST = Histogram((0, 100, 200, 300, 400, 800), (5, 40, 30, 0, 25))
MINDSPEED = Traits("mindspeed-rl", GLOBAL_BATCH, MemoryFeatures(reuse_fp32_param=True), response_head=False)


def test_npu_flash_attention_keeps_16_fp32_statistics_per_head(specs):
    # the layer's 1728 bytes hold 4 B x 8 tokens x 2 heads of statistics (one log-sum-exp per head and token)
    lay, train = specs.layout(1), specs.training()
    assert flash_stats_bytes(specs.model(), lay, 8, MemoryFeatures()) == 4 * 1 * 8 * 2
    assert layer_activation_bytes(specs.model(), lay, train, 2) == 1728
    # npu_fusion_attention: softmax_max and softmax_sum, each [b, n, s, 8] fp32 -> 16 values per head and token
    npu = MemoryFeatures(flash_stats=16)
    assert layer_activation_bytes(specs.model(), lay, train, 2, features=npu) == 1728 + 4 * 15 * 8 * 2


def test_reuse_fp32_param_saves_2_bytes_per_parameter_of_the_shard(specs):
    """MindSpeed: the shard's fp32 master is rebuilt from the bf16 parameters plus a 2 B residual."""
    m, train = specs.model(), specs.training()
    for world in (1, 4):  # 1704 parameters; dp 1 and dp 4
        lay = specs.layout(world)
        plain = estimate_memory(m, specs.hardware(devices_per_node=world), lay, train).stages[0]
        reused = estimate_memory(m, specs.hardware(devices_per_node=world), lay, train, traits=MINDSPEED).stages[0]
        assert plain.optimizer == 12 * 1704 / world
        assert reused.optimizer == 10 * 1704 / world  # 2 B x params / dp less
        assert reused.weights == plain.weights and reused.gradients == plain.gradients
    # the target renders it only with the distributed optimizer in bf16
    lay = specs.layout(1, distributed_optimizer=False)
    assert estimate_memory(m, specs.hardware(), lay, train, traits=MINDSPEED).stages[0].optimizer == 12 * 1704
    fp32 = specs.training(precision="fp32")
    assert estimate_memory(m, specs.hardware(), specs.layout(1), fp32, traits=MINDSPEED).stages[0].optimizer == \
        8 * 1704


def test_reuse_fp32_param_on_the_guides_first_stage(specs):
    """TP2 PP8 on 32 dies (DP 2): 2,025,743,872 parameters x 2 B / 2 = 1.887 GiB off the 26.41 GiB static."""
    lay = specs.layout(32, tp=2, pp=8, layers=48)
    m = specs.qwen3_30b_a3b()
    plain = estimate_memory(m, specs.hardware(), lay, specs.training(4096)).stages[0]
    reused = estimate_memory(m, specs.hardware(), lay, specs.training(4096), traits=MINDSPEED).stages[0]
    assert plain.static - reused.static == 2_025_743_872 * 2 / 2
    assert reused.static / GIB == pytest.approx(24.52, abs=0.01)


def test_swap_attention_keeps_one_layer_of_the_attention_block_on_the_device(specs):
    # swapped: the two norms' and qkv's inputs 2*8*3*8 = 384, the flash output o 2*8*8 = 128, the statistics
    # 4*8*2 = 64; the fused qkv output 2*8*(8 + 2*4) = 256 stays (v is a view of it)
    m, train = specs.model(), specs.training()
    swap = specs.layout(1, swap_attention=True)
    assert swapped_bytes(m, specs.layout(1), train, 2, MemoryFeatures()) == 0
    assert swapped_bytes(m, swap, train, 2, MemoryFeatures()) == 704 - 256 + 128
    plain = estimate_memory(m, specs.hardware(), specs.layout(1), train).stages[0]
    swapped = estimate_memory(m, specs.hardware(), swap, train).stages[0]
    # one micro-batch held (pp 1), 2 layers: each keeps 1728 - 576 on the device; the final norm and head
    # inputs 2*2*8*8 = 256 stay
    assert plain.activations == 2 * 1728 + 256 and swapped.activations == 2 * (1728 - 576) + 256
    # the transient: the reference's layer forward (1728 > logits 8*32*6 = 1536) plus one swapped layer
    assert plain.transient == 1728 and swapped.transient == 1728 + 576


def test_mindspeed_pads_every_micro_batch_to_its_global_batchs_longest(specs):
    """Expected longest of 16 pairs' longer sides, rounded up to lcm(8, tp) = 8; against a seeded simulation of
    MindSpeed-RL's loader (a global batch padded to its longest, pad_to_multiple_of=8)."""
    stats = LengthStats("test", HIST.total, HIST, Histogram(tuple(2 * e for e in HIST.edges), HIST.counts), HIST,
                        799)
    lay = specs.layout(2, tp=2, gbs=16)
    train = specs.training(seq_length=800, dynamic_padding=True)
    rows = stats.micro_batches(lay, train, GLOBAL_BATCH)
    first, _ = HIST.order_statistics(16)
    assert rows.lengths == (first[0] + 3.5,) * lay.num_microbatches and rows.together
    assert rows.peak == 800 and rows.step_mean == rows.lengths[0]
    rng = random.Random(0)
    steps = [max(HIST.quantile(rng.random()) for _ in range(16)) for _ in range(20_000)]
    simulated = sum(math.ceil(x / 8) * 8 for x in steps) / len(steps)
    assert rows.lengths[0] == pytest.approx(simulated, rel=0.01)
    sort_and_cut = stats.micro_batches(lay, train)
    assert sort_and_cut.mean < rows.mean and not sort_and_cut.together


def test_global_batch_padding_holds_every_in_flight_micro_batch_at_the_peak(specs):
    """The step holding the dataset's longest pair pads all its micro-batches to it: stage 0 of pp 4 holds 4
    micro-batches at the peak, where sort-and-cut holds one there and the rest at their expected lengths."""
    stats = LengthStats("test", HIST.total, HIST, Histogram(tuple(2 * e for e in HIST.edges), HIST.counts), HIST,
                        799)
    m, lay = specs.model(num_layers=4), specs.layout(4, pp=4, gbs=8, layers=4)
    train = specs.training(seq_length=800, dynamic_padding=True)
    together = estimate_memory(m, specs.hardware(), lay, train, stats, traits=MINDSPEED).stages[0]
    cut = estimate_memory(m, specs.hardware(), lay, train, stats, traits=DPOC_CPU).stages[0]
    per_layer = layer_activation_bytes(m, lay, specs.training(seq_length=800), 2)
    assert together.activations == 4 * per_layer
    assert per_layer < cut.activations < together.activations
