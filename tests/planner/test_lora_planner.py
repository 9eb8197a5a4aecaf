"""LoRA in the planner, against counts done by hand on the toy dense model (conftest.model: h 8, q 8, kv 4,
FFN 16, vocab 32, 2 layers, 1704 parameters) with rank-2 adapters.

Adapter parameters per layer at tp 1, r * (in + out): qkv 2*(8+16) = 48, proj 2*(8+8) = 32, fc1 2*(8+32) = 80,
fc2 2*(16+8) = 48 -> 208, 416 for the model. At tp 2 each is split as its weight is: qkv A 16 + B 16/2*2 = 32,
proj A 2*8/2 + B 16 = 24, fc1 A 16 + B 32/2*2 = 48, fc2 A 2*16/2 + B 16 = 32 -> 136.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from dpoc.contract.architecture import MoESpec
from dpoc.contract.lora import MCORE_TARGETS, Lora
from dpoc.planner.lengths import MeanLength
from dpoc.planner.lora import layer_adapter_params, layer_adapter_tensors
from dpoc.planner.memory import estimate_memory, layer_activation_bytes, unfused_kernel_bytes
from dpoc.planner.params import Shard
from dpoc.planner.throughput import Efficiency, predict, training_flops_per_sequence
from dpoc.planner.workload import dpo_workload

LORA = Lora(rank=2, alpha=4.0, dropout=0.0, targets=MCORE_TARGETS, experts=False, init_from=None)


def test_adapter_parameters_are_split_as_their_weights(specs):
    m = specs.model()
    assert layer_adapter_params(m, specs.layout(1), LORA) == Shard(208, 0)
    assert layer_adapter_params(m, specs.layout(2, tp=2), LORA) == Shard(136, 0)
    assert layer_adapter_tensors(m, specs.layout(1), LORA) == Shard(8, 0)


def test_moe_targets_adapt_the_experts_only_with_experts(specs):
    m = specs.model(moe=MoESpec(num_experts=4, topk=2, ffn_hidden_size=4, aux_loss_coeff=0.0, norm_topk_prob=True))
    lay = specs.layout(4, ep=2, etp=1)
    # attention only (48 + 32); with experts each of the 2 local experts adds fc1 2*(8+8) + fc2 2*(4+8)
    assert layer_adapter_params(m, lay, LORA) == Shard(80, 0)
    assert layer_adapter_params(m, lay, replace(LORA, experts=True)) == Shard(80, 2 * (32 + 24))
    assert layer_adapter_tensors(m, lay, replace(LORA, experts=True)) == Shard(4, 2 * 4)


def test_frozen_base_holds_weights_only_and_no_reference(specs):
    m = specs.model()
    lora = dpo_workload("live", LORA)
    (stage,) = estimate_memory(m, specs.hardware(), specs.layout(1), specs.training(), workload=lora).stages
    assert (stage.weights, stage.gradients, stage.optimizer, stage.reference) == (
        2 * (1704 + 416), 4 * 416, 12 * 416, 0)
    # dp 4 shards the adapters' optimizer state; another model as checkpoint.ref_model is held as today
    (stage,) = estimate_memory(m, specs.hardware(), specs.layout(4), specs.training(),
                               workload=dpo_workload("live", LORA, ref_model=True)).stages
    assert (stage.optimizer, stage.reference) == (12 * 416 / 4, 2 * 1704)


def test_activations_keep_only_the_adapted_linears_inputs(specs):
    # s 4, 2 sequences = 8 tokens, bf16, tp 1 (full training: 216 B/token, test_memory)
    m, lay, train = specs.model(), specs.layout(1), specs.training()
    # every linear adapted: the same inputs as full training, plus A's output, 2 B * 2 per adapter
    assert layer_activation_bytes(m, lay, train, 2, LORA) == (216 + 4 * 4) * 8
    # only qkv: attention 16 (norm) + 16 (qkv input) + 32 (q, k, v) + 0 (o: proj is frozen) + 8 (stats)
    # + 4 (A's output); MLP 16 (norm) + 64 (SwiGLU input) -> 156 B/token
    qkv = replace(LORA, targets=("linear_qkv",))
    assert layer_activation_bytes(m, lay, train, 2, qkv) == 156 * 8
    # dropout: the dropped copy of qkv's input instead of it, and its one-byte mask
    assert layer_activation_bytes(m, lay, train, 2, replace(qkv, dropout=0.1)) == (156 + 8) * 8


def test_moe_frozen_experts_keep_only_their_activation_input(specs):
    m = specs.model(moe=MoESpec(num_experts=4, topk=2, ffn_hidden_size=4, aux_loss_coeff=0.0, norm_topk_prob=True))
    lay, train = specs.layout(8, tp=2, ep=4, etp=1), specs.training()
    full = layer_activation_bytes(m, lay, train, 2)
    # 8 expert copies: without expert adapters each drops its fc1 input (2*8) and fc2 input (2*4);
    # the attention adapters add A's outputs over the 8 gathered tokens, 2 B * 2 each; qkv's adapter keeps
    # its gathered input (8 tokens x 2*8 B) where the trained weight kept its sequence shard (4 tokens)
    gathered = (8 - 4) * 2 * 8
    assert layer_activation_bytes(m, lay, train, 2, LORA) == full - 8 * (16 + 8) + 2 * 8 * 2 * 2 + gathered
    experts = replace(LORA, experts=True)
    assert layer_activation_bytes(m, lay, train, 2, experts) == full + 2 * 8 * 2 * 2 + 8 * 2 * 2 * 2 + gathered


def test_lora_flops_skip_the_frozen_weight_gradients(specs):
    # forward per sequence at s 4: 4 * (2304 + 512) + 512 = 11776 (a third of test_throughput's 35328);
    # adapters 2 * 2 * 104 per token and layer -> 4 * 2 * 416 = 3328. LoRA: 2 x forward (input gradients
    # only), core attention's backward (another 512), 3 x the adapters -> 23552 + 512 + 9984
    assert training_flops_per_sequence(specs.model(), 4, lora=LORA) == 34048
    hw = specs.hardware(devices_per_node=1, peak_tflops=1e-6)
    t = predict(specs.model(), hw, specs.layout(1, gbs=2), specs.training(), Efficiency(0.5, 0.5), MeanLength(4),
                dpo_workload("live", LORA))
    # per micro-batch (2 sequences): policy 2 * 34048, the reference (adapters off) 2 * 11776
    assert t.step_s == pytest.approx(2 * (2 * 34048 + 2 * 11776) / 0.5e6)
    assert t.mfu == pytest.approx(0.5 * 34048 / (34048 + 11776))


def test_only_the_adapters_gradients_are_reduced(specs):
    hw = specs.hardware(devices_per_node=4)
    lay = specs.layout(4, gbs=8)
    runs = {name: predict(specs.model(), hw, lay, specs.training(), Efficiency(0.5, 0.5), MeanLength(4), w)
            for name, w in (("full", dpo_workload("live")), ("lora", dpo_workload("live", LORA)))}
    # each run's calls: the reduce-scatter and the all-gather, the gradient norm's, metrics' and preemption
    # check's all-reduces, at the hardware's collective_latency_us
    calls = 2 + 3
    bandwidth = {name: t.data_parallel_s - calls * hw.collective_latency_us * 1e-6 for name, t in runs.items()}
    assert bandwidth["lora"] / bandwidth["full"] == pytest.approx(416 / 1704)


def test_frozen_norms_and_head_keep_no_normalized_output(specs):
    """On the CPU's unfused kernels a norm keeps its normalized output only for its weight's gradient, and
    the output layer its input only for its own: under LoRA both are frozen. Measured against the runtime:
    tiny-qwen3, one micro-batch, LoRA on every linear, predicted/measured activations +14.3 % (1 process),
    +13.5 % (tp2 + sp), +23 % on pp2's last stage, where full training is +12.2 %, +12.2 % and +22 %."""
    m, lay, train = specs.model(qk_layernorm=True), specs.layout(1), specs.training()
    full_layer, full_last = unfused_kernel_bytes(m, lay, train, 2)
    lora_layer, lora_last = unfused_kernel_bytes(m, lay, train, 2, frozen=True)
    # 8 tokens, 2 B: two norms' h-wide outputs (2 * 8 * 8 * 2) and the q and k norms' (2 * 8 * (8 + 4))
    assert full_layer - lora_layer == 2 * 8 * 8 * 2 + 2 * 8 * (8 + 4)
    assert full_last - lora_last == 8 * 8 * 2
    cpu = specs.hardware(device="cpu")
    full = estimate_memory(m, cpu, lay, train).stages[0]
    lora = estimate_memory(m, cpu, lay, train, workload=dpo_workload("live", LORA)).stages[0]
    # per layer: the adapters' A outputs (4 adapters x 2 wide x 8 tokens x 2 B) less the normalized outputs;
    # the last stage: the final norm's normalized output and the head's input
    per_layer = layer_activation_bytes(m, lay, train, 2, LORA) - layer_activation_bytes(m, lay, train, 2)
    assert per_layer == 4 * 2 * 8 * 2
    assert full.activations - lora.activations == 2 * (2 * 8 * 8 * 2 + 2 * 8 * 12 - per_layer) + 2 * 8 * 8 * 2
