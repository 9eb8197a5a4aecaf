"""The throughput model: FLOP counts against the published worked example and toy runs counted by hand.

Toy dense model (conftest.model): h 8, q 8, kv 4, FFN 16, vocab 32, 2 layers. Training FLOPs per token:
  projections 6*(8*(8+2*4) + 8*8) = 1152 and SwiGLU MLP 6*3*8*16 = 2304 per layer -> 6912 for 2 layers,
  logits 6*8*32 = 1536; causal core attention 6*q*s^2 per layer = 96 s^2 per sequence.
At s = 4 one sequence costs 4*(6912 + 1536) + 96*16 = 35328 FLOPs.
"""

from __future__ import annotations

import pytest

from dpoc.contract.architecture import MoESpec
from dpoc.planner.calibration import Published, fit, predicted
from dpoc.planner.lengths import MeanLength
from dpoc.planner.throughput import (
    FITTED,
    Efficiency,
    link_gbps,
    predict,
    training_flops_per_sequence,
)
from dpoc.planner.workload import PRETRAIN

SEQ_FLOPS = 35328


def test_toy_flops_per_sequence(specs):
    assert training_flops_per_sequence(specs.model(), 4) == SEQ_FLOPS


def test_qwen3_30b_flops_per_token_worked_example(specs):
    # formulas-and-anchors §1.6: MLP 10.87 + projections 5.44 + logits 1.87 + core attention 6*q*s*L
    m = specs.qwen3_30b_a3b()
    for seq, gflop in ((4096, 23.0), (16384, 37.5), (32768, 56.8)):
        assert training_flops_per_sequence(m, seq) / seq / 1e9 == pytest.approx(gflop, abs=0.05)


def test_dpo_step_on_one_device(specs):
    # 1 device at 1e6 FLOP/s, efficiency 0.5, GBS 2 pairs, MBS 1 -> 2 micro-batches of 2 sequences.
    # per micro-batch: policy 2 * 35328 = 70656, reference forward 70656 / 3 = 23552 -> 94208 FLOPs
    hw = specs.hardware(devices_per_node=1, peak_tflops=1e-6)
    t = predict(specs.model(), hw, specs.layout(1, gbs=2), specs.training(), Efficiency(0.5, 0.5), MeanLength(4))
    micro = 94208 / (0.5 * 1e6)
    assert t.step_s == pytest.approx(2 * micro)
    assert t.samples_per_s == pytest.approx(2 / (2 * micro))
    assert t.tokens_per_s == pytest.approx(2 * 2 * 4 / (2 * micro))
    assert t.mfu == pytest.approx(0.5 * 3 / 4)  # policy FLOPs are 3 of the 4 forward units
    assert t.dpo_mfu == pytest.approx(0.5)


def test_full_recompute_costs_one_more_policy_forward(specs):
    hw = specs.hardware(devices_per_node=1, peak_tflops=1e-6)
    lay = specs.layout(1, gbs=2, recompute="full", recompute_method="uniform", recompute_num_layers=1)
    t = predict(specs.model(), hw, lay, specs.training(), Efficiency(0.5, 0.5), MeanLength(4))
    assert t.step_s == pytest.approx(2 * (94208 + 70656 / 3) / 0.5e6)
    assert t.mfu == pytest.approx(0.5 * 3 / 5)


def test_pretrain_workload_has_no_reference(specs):
    hw = specs.hardware(devices_per_node=1, peak_tflops=1e-6)
    lay = specs.layout(1, gbs=2)
    t = predict(specs.model(), hw, lay, specs.training(), Efficiency(0.5, 0.5), MeanLength(4), PRETRAIN)
    assert t.step_s == pytest.approx(2 * SEQ_FLOPS / 0.5e6)
    assert t.mfu == t.dpo_mfu == pytest.approx(0.5)


def test_pipeline_bubble(specs):
    # pp 2 on 2 devices, 4 micro-batches; the last stage (one layer + logits) is the slowest. Training FLOPs
    # of one sequence there: 4 tokens * (3456 + 1536) + core attention 6*8*4^2 = 768; a micro-batch is
    # 2 sequences, and policy + reference cost 4/3 of training.
    hw = specs.hardware(devices_per_node=2, peak_tflops=1e-6, intra_node_gbps=1e9)
    lay = specs.layout(2, pp=2, gbs=4)
    t = predict(specs.model(), hw, lay, specs.training(), Efficiency(1.0, 1.0), MeanLength(4))
    last_stage_train = 4 * (3456 + 1536) + 768
    micro = 2 * last_stage_train * 4 / 3 / 1e6
    # latency only at this bandwidth, 10 us a call: the policy's and the reference's activations forward and
    # the gradient back, each an isend or irecv after one for its shape; per step the gradient norm's, the
    # metrics' and the preemption check's all-reduces (dp 1: no gradient collectives)
    p2p = 2 * 3 * 10e-6
    step_collectives = (3 + (1 if specs.model().tie_embeddings else 0)) * 10e-6
    assert t.bubble_s == pytest.approx(micro + p2p, rel=1e-6)
    assert t.step_s == pytest.approx((4 + 1) * (micro + p2p) + step_collectives, rel=1e-6)


def test_links_by_group_span(specs):
    a2 = specs.hardware(devices_per_node=8, intra_node_gbps=196, inter_node_gbps=25, nodes=4)
    assert [link_gbps(a2, span) for span in (2, 8, 16)] == [196, 196, 25]
    a3 = specs.hardware(devices_per_node=16, superpod_nodes=48, superpod_gbps=196, inter_node_gbps=25,
                        nodes=64)
    assert [link_gbps(a3, span) for span in (16, 32, 768, 1024)] == [196, 196, 196, 25]


def test_fit_recovers_the_efficiencies_that_produced_the_numbers(specs):
    moe = MoESpec(num_experts=4, topk=2, ffn_hidden_size=4, aux_loss_coeff=0.0, norm_topk_prob=True)
    dense_model, moe_model = specs.model(), specs.model(moe=moe, family="qwen3_moe")
    hw = specs.hardware(devices_per_node=2, peak_tflops=1e-6)
    truth = Efficiency(0.4, 0.2)

    def case(m, knobs):
        probe = Published("probe", m, hw, 8, knobs, 4, PRETRAIN, 1.0, "synthetic")
        value = predicted(probe, truth)
        return Published(m.name, m, hw, 8, knobs, 4, PRETRAIN, value, "synthetic")

    cases = (case(dense_model, {"tp": 2}), case(dense_model, {}), case(moe_model, {"ep": 2, "etp": 1}))
    result = fit(cases)
    assert result.efficiency.dense == pytest.approx(0.4, rel=1e-6)
    assert result.efficiency.experts == pytest.approx(0.2, rel=1e-6)


def _slow_link(specs, devices):
    """Links at 1e6 bytes/s once the 0.7 efficiency is applied; compute effectively free."""
    return specs.hardware(devices_per_node=devices, intra_node_gbps=1e-3 / 0.7, peak_tflops=1e12)


def test_tensor_parallel_collectives(specs):
    # tp 2 + SP, 1 pair of 4-token sequences: one [4 tokens, 2 seqs, h 8] bf16 activation = 128 bytes.
    # Passes per layer: policy forward, backward, reference forward = 3; 4 collectives per layer and pass
    # -> 3 * 2 layers * 4 = 24 ops, each moving (2-1)/2 * 128 = 64 bytes: 1536 bytes at 1e6 B/s. Calls at
    # 10 us: 4 per layer in both forwards and 6 in the backward (2 layers: 28), the embedding's reduce-scatter
    # in both forwards and its all-gather backward (3), the head's all-gather and the cross entropy's 3
    # all-reduces in both forwards (8) and the head's backward all-reduce (1)
    lay = specs.layout(2, tp=2, gbs=1)
    assert lay.sequence_parallel
    t = predict(specs.model(), _slow_link(specs, 2), lay, specs.training(), Efficiency(1, 1), MeanLength(4))
    assert t.communication_s == pytest.approx(1536e-6 + (28 + 3 + 8 + 1) * 10e-6)


def test_expert_all_to_all(specs):
    # ep 2, tp 1: each of 3 passes x 2 layers dispatches and combines (12 ops) the top-2 copies of the
    # 128-byte activation, half of which leave the rank: 12 * 2 * 128 / 2 = 1536 bytes + 12 x 10 us
    moe = MoESpec(num_experts=4, topk=2, ffn_hidden_size=4, aux_loss_coeff=0.0, norm_topk_prob=True)
    m = specs.model(moe=moe, family="qwen3_moe")
    lay = specs.layout(2, ep=2, etp=1, gbs=2)
    t = predict(m, _slow_link(specs, 2), lay, specs.training(), Efficiency(1, 1), MeanLength(4))
    assert t.communication_s == pytest.approx(1536e-6 + 12 * 10e-6)


def test_data_parallel_reduce_scatter_and_all_gather(specs):
    # dp 2, distributed optimizer: fp32 gradients reduce-scattered (4 B) and bf16 weights all-gathered (2 B)
    # for the 1704 parameters, half of each leaving the rank: 1704 * 6 / 2 = 5112 bytes + 2 calls x 10 us, and
    # the step's gradient-norm, metrics and preemption-check all-reduces (3 calls)
    t = predict(specs.model(), _slow_link(specs, 2), specs.layout(2, gbs=2), specs.training(),
                Efficiency(1, 1), MeanLength(4))
    assert t.data_parallel_s == pytest.approx(5112e-6 + (2 + 3) * 10e-6)


def test_shipped_efficiencies_match_a_fresh_fit_on_the_published_non_dpo_numbers(specs):
    fresh = fit().efficiency
    assert fresh.dense == pytest.approx(FITTED.dense, abs=5e-4)
    assert fresh.experts == pytest.approx(FITTED.experts, abs=5e-4)
