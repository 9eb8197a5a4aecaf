"""The memory model against counts done by hand and the published anchors.

Toy dense model (conftest.model): h 8, 2 layers, 2 heads x 4 = q 8, 1 KV group (kv 4), FFN 16, vocab 32.
  attention 2*8*8 + 2*8*4 = 192, SwiGLU MLP 3*8*16 = 384, norms 2*8 = 16 per layer; embedding 32*8 = 256.
"""

from __future__ import annotations

import pytest

from dpoc.contract.architecture import MoESpec
from dpoc.planner.lengths import MeanLength
from dpoc.planner.memory import (
    GIB,
    MIB,
    estimate_memory,
    in_flight_chunks,
    layer_activation_bytes,
)
from dpoc.planner.params import real_layers_per_stage, stage_shard


def test_dense_static_is_20_bytes_per_param_at_dp1(specs):
    m = specs.model()
    est = estimate_memory(m, specs.hardware(), specs.layout(1), specs.training())
    (stage,) = est.stages
    assert stage.params == 1704
    assert (stage.weights, stage.gradients, stage.optimizer, stage.reference) == (
        2 * 1704, 4 * 1704, 12 * 1704, 2 * 1704)
    assert stage.static == 20 * 1704


def test_distributed_optimizer_shards_over_dp(specs):
    m = specs.model()
    sharded = estimate_memory(m, specs.hardware(), specs.layout(4), specs.training()).stages[0]
    assert sharded.optimizer == 12 * 1704 / 4
    assert sharded.static == 8 * 1704 + 12 * 1704 / 4  # 18744
    plain = specs.layout(4, distributed_optimizer=False)
    assert estimate_memory(m, specs.hardware(), plain, specs.training()).stages[0].optimizer == 12 * 1704


def test_fp32_training_keeps_no_separate_master(specs):
    fp32 = specs.training(precision="fp32")
    (stage,) = estimate_memory(specs.model(), specs.hardware(), specs.layout(1), fp32).stages
    # fp32 weight 4 + grad 4 + Adam m, v 8 + fp32 reference 4
    assert stage.static == 20 * 1704


def test_tp_pp_shards_and_embedding_placement(specs):
    m = specs.model()
    lay = specs.layout(4, tp=2, pp=2)
    # stage 0: one layer 576/2 + 16, embedding 256/2;  stage 1: one layer, final norm 8, head 256/2
    assert [stage_shard(m, lay, s, 1).total for s in (0, 1)] == [304 + 128, 304 + 8 + 128]
    tied = specs.model(tie_embeddings=True)
    # tied and pp > 1: the last stage keeps its own copy of the embedding
    assert [stage_shard(tied, lay, s, 1).total for s in (0, 1)] == [432, 440]
    # tied and pp = 1: one copy only
    assert stage_shard(tied, specs.layout(1), 0, 2).total == 2 * 592 + 256 + 8


def test_noop_layers_hold_no_parameters(specs):
    # 3 real layers + 1 no-op (index 3) on pp 2: stages hold 2 and 1 real layers
    lay = specs.layout(2, pp=2, layers=3, noop=(3,))
    assert real_layers_per_stage(lay) == (2, 1)
    uneven = specs.layout(2, pp=2, layers=3, stage_layers=(1, 2))
    assert real_layers_per_stage(uneven) == (1, 2)
    # interleaved pp 2 vpp 2 over 4 layers: stage 0 runs layers 0 and 2, stage 1 layers 1 and 3 (no-op)
    inter = specs.layout(2, pp=2, vpp=2, layers=3, noop=(3,))
    assert real_layers_per_stage(inter) == (2, 1)


def test_dense_layer_activations_by_hand(specs):
    # s 4, 1 pair = 2 sequences = 8 tokens, bf16, tp 1. Bytes per token:
    #   attention: norm + qkv inputs 2*(8+8) = 32; q, k, v, o 2*(8+4+4+8) = 48; softmax stats 4*2 = 8
    #   MLP: norm + fc1 inputs 2*(8+8) = 32; SwiGLU in + fc2 in 2*3*16 = 96        -> 216 B/token
    assert layer_activation_bytes(specs.model(), specs.layout(1), specs.training(), 2) == 216 * 8


def test_sequence_parallel_and_context_parallel_divide_activations(specs):
    m = specs.model()
    # tp 2 with SP: every term halves -> 864;  without SP the 64 B/token of h-sized inputs stay whole:
    # 8 * (64 + 152 / 2) = 1120
    assert layer_activation_bytes(m, specs.layout(2, tp=2), specs.training(), 2) == 864
    no_sp = specs.layout(2, tp=2, sequence_parallel=False)
    assert layer_activation_bytes(m, no_sp, specs.training(), 2) == 8 * (64 + 152 / 2)
    # cp 2 halves the tokens
    assert layer_activation_bytes(m, specs.layout(2, cp=2), specs.training(seq_length=4), 2) == 864


def test_stage_activations_logits_and_transient(specs):
    est = estimate_memory(specs.model(), specs.hardware(), specs.layout(1), specs.training())
    (stage,) = est.stages
    assert stage.activations == 2 * 1728 + 2 * 2 * 8 * 8  # two layers + final-norm/head inputs (256)
    assert stage.logits == 8 * 32 * (2 + 4)  # bf16 logits and their fp32 softmax
    assert stage.transient == 1728  # the reference forward through one layer
    assert stage.pipeline_buffers == 0


def test_full_recompute_keeps_layer_inputs(specs):
    lay = specs.layout(1, recompute="full", recompute_method="uniform", recompute_num_layers=1)
    (stage,) = estimate_memory(specs.model(), specs.hardware(), lay, specs.training()).stages
    assert stage.activations == 2 * (2 * 8 * 8) + 256  # one [8 tokens, h 8] bf16 input per layer
    assert stage.transient == 1728  # one layer recomputed at a time
    block = specs.layout(1, recompute="full", recompute_method="block", recompute_num_layers=1)
    (stage,) = estimate_memory(specs.model(), specs.hardware(), block, specs.training()).stages
    assert stage.activations == 128 + 1728 + 256  # first layer checkpointed, second stored


def test_pipeline_in_flight_micro_batches(specs):
    lay = specs.layout(4, pp=4, gbs=8, layers=4)  # dp 1, 8 micro-batches
    assert [in_flight_chunks(lay, s) for s in range(4)] == [4, 3, 2, 1]
    # interleaved: pp*(vpp+1) - 1 - 2*stage chunks of half a stage
    inter = specs.layout(4, pp=4, vpp=2, gbs=8, layers=8)
    assert [in_flight_chunks(inter, s) for s in range(4)] == [11, 9, 7, 5]
    few = specs.layout(4, pp=4, gbs=2, layers=4)
    assert [in_flight_chunks(few, s) for s in range(4)] == [2, 2, 2, 1]
    est = estimate_memory(specs.model(num_layers=4), specs.hardware(), lay, specs.training())
    # stage 1 receives [s 4, 4 sequences, h 8] bf16 = 256 B per held micro-batch, 3 held
    assert est.stages[1].pipeline_buffers == 3 * 256
    assert est.stages[0].pipeline_buffers == 0
    assert est.stages[0].activations == 4 * 1728


def _toy_moe(specs):
    moe = MoESpec(num_experts=4, topk=2, ffn_hidden_size=4, aux_loss_coeff=0.0, norm_topk_prob=True)
    return specs.model(family="qwen3_moe", moe=moe)


def test_moe_parameters_and_expert_data_parallel_optimizer(specs):
    # per layer: attention 192 (tp), norms 16 + router 8*4 = 48 (replicated), experts 4*3*8*4 = 384
    m = _toy_moe(specs)
    lay = specs.layout(8, tp=2, ep=4, etp=1)  # dp 4, edp 8 / (1*4*1) = 2
    assert (lay.dp, lay.edp) == (4, 2)
    shard = stage_shard(m, lay, 0, 2)
    assert shard.dense == 2 * (192 // 2 + 48) + 128 + 8 + 128 == 552
    assert shard.experts == 2 * 384 // 4 == 192
    (stage,) = estimate_memory(m, specs.hardware(), lay, specs.training()).stages
    assert stage.optimizer == 12 * 552 / 4 + 12 * 192 / 2
    assert stage.reference == 2 * (552 + 192)


def test_moe_layer_activations_by_hand(specs):
    # s 4, 2 sequences: 8 tokens, tp 2 + SP -> 4 local tokens, etp 1
    #   attention: 2*4*16 = 128 (inputs, local) + 2*8*(8+4+4+8)/2 = 192 + fp32 stats 4*8*2/2 = 32 -> 352
    #   router: 2*4*16 = 128 (norm/router inputs) + 4*4*2*4 = 128 (fp32 logits + probs)
    #   experts: 2 * 4 local tokens = 8 copies, each fc1 input 2*8 + SwiGLU/fc2 inputs 2*3*4 = 40,
    #            plus unpermute's output 2*8 and prob 4 = 20 -> 8 * 60 = 480
    m = _toy_moe(specs)
    lay = specs.layout(8, tp=2, ep=4, etp=1)
    assert layer_activation_bytes(m, lay, specs.training(), 2) == 352 + 128 + 128 + 480
    (stage,) = estimate_memory(m, specs.hardware(), lay, specs.training()).stages
    # transient: the reference forward through one layer + dispatch send/recv 2 * 2*(2 * 4 tokens * 8)
    assert stage.transient == 1088 + 256
    # etp 2: the experts see both tp ranks' copies (16), each 2*8 + 2*3*4/2 = 28; unpermute still 8 * 20
    lay = specs.layout(8, tp=2, ep=2, etp=2)
    assert layer_activation_bytes(m, lay, specs.training(), 2) == 352 + 128 + 128 + 16 * 28 + 8 * 20


def test_hccl_buffers_and_reserve(specs):
    hw = specs.hardware(hccl_buffsize_mb=256, reserved_gib=4.9)
    m = specs.qwen3_30b_a3b()
    lay = specs.layout(32, tp=2, pp=8, layers=48)  # dp 2, etp 2, edp 2
    first = estimate_memory(m, hw, lay, specs.training(4096)).stages[0]
    # communicators: tp, dp, pp, tp*pp (grad norm), etp, edp = 6, each 2 x 256 MiB
    assert first.comm_buffers == 6 * 2 * 256 * MIB
    assert first.reserve == 4.9 * GIB


def test_mindspeed_ci_dpo_baseline_qwen3_30b_4_layers(specs):
    """MindSpeed-LLM CI: 4-layer Qwen3-30B-A3B DPO, TP2 PP4 on 8 dies (DP 1, EDP 1), allocated after a step"""
    # one layer per stage, per rank: attention 18,874,368/2 + experts 603,979,776/2
    #   + replicated (norms 4096 + qk-norms 256 + router 262,144) = 311,693,568 params; x 20 B
    middle = 311_693_568 * 20 / MIB  # 5945.0 MiB, published 5963.6
    first = (311_693_568 + 151936 * 2048 // 2) * 20 / MIB  # + embedding / tp: 8912.6, published 8925.5
    est = estimate_memory(specs.qwen3_30b_a3b(4), specs.hardware(), specs.layout(8, tp=2, pp=4, layers=4),
                          specs.training(4096))
    static = [s.static / MIB for s in est.stages]
    assert static[1] == pytest.approx(middle) and static[2] == pytest.approx(middle)
    assert static[0] == pytest.approx(first)
    assert static[1] == pytest.approx(5963.6, rel=0.01)
    assert static[0] == pytest.approx(8925.5, rel=0.01)
    assert static[3] == pytest.approx(8931.1, rel=0.01)


def test_worked_example_qwen3_30b_tp2_pp8_32_dies(specs):
    """formulas-and-anchors §1.6: TP2 PP8 EP1 (ETP = TP) on 32 dies, DP 2, EDP 2."""
    # first stage: 6 layers x 311,693,568 + embedding 155,582,464 = 2,025,743,872 params;
    # policy 2 + 4 + 12/2 = 12 B, reference 2 B -> 14 B/param = 26.41 GiB
    est = estimate_memory(specs.qwen3_30b_a3b(), specs.hardware(), specs.layout(32, tp=2, pp=8, layers=48),
                          specs.training(4096))
    first = est.stages[0]
    assert first.params == 6 * 311_693_568 + 155_582_464
    assert first.static / GIB == pytest.approx(2_025_743_872 * 14 / GIB)
    assert first.static / GIB == pytest.approx(26.4, abs=0.05)
    # TP2 PP4 EP8 ETP1 (DP 4, EDP 1), 12 layers on the first stage:
    #   dense (attention 9,437,184 + replicated 266,496) x 12 + embedding 155,582,464
    #     = 272,026,624 params x (8 + 12/4)
    #   experts 603,979,776 / 8 x 12 = 905,969,664 params x (8 + 12/1)     -> 19.66 GiB
    lay = specs.layout(32, tp=2, pp=4, ep=8, etp=1, layers=48)
    first = estimate_memory(specs.qwen3_30b_a3b(), specs.hardware(), lay, specs.training(4096)).stages[0]
    assert first.static == 272_026_624 * 11 + 905_969_664 * 20
    assert first.static / GIB == pytest.approx(19.7, abs=0.1)


def test_dynamic_padding_holds_one_long_micro_batch_and_the_rest_at_the_mean(specs):
    # pp 4, one toy layer per stage; stage 0 holds 4 micro-batches: one at the cap (4 tokens per sequence),
    # three at the mean 2 -> 1 + 3 * 2/4 = 2.5 micro-batches of 1728 bytes
    lay = specs.layout(4, pp=4, gbs=8, layers=4)
    dynamic = specs.training(dynamic_padding=True)
    est = estimate_memory(specs.model(num_layers=4), specs.hardware(), lay, dynamic, MeanLength(2))
    assert est.stages[0].activations == 2.5 * 1728
    assert est.stages[1].pipeline_buffers == (1 + 2 * 0.5) * 256
    static = estimate_memory(specs.model(num_layers=4), specs.hardware(), lay, specs.training(), MeanLength(2))
    assert static.stages[0].activations == 4 * 1728  # static padding ignores the mean


def test_mindspeed_ci_llama3_8b_dpo_static(specs):
    """MindSpeed-LLM CI: 8-layer Llama3-8B DPO, TP2 PP2 VPP2 CP2 on 8 devices (DP 1), no distributed optimizer

    Per layer and rank: attention (2*4096*4096 + 2*4096*1024)/2 + SwiGLU 3*4096*14336/2 + norms 8192
      = 109,060,096; 4 layers + embedding 128256*4096/2 = 262,668,288 -> 698,908,672 params (the CI note's
      699 M), x 20 B = 13,330.5 MiB. (The CI run allocates 16,079 MiB: workspaces this model leaves out.)
    """
    llama = specs.model(name="llama3-8b", family="llama", num_layers=8, hidden_size=4096,
                        ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8, head_dim=128,
                        vocab_size=128256)
    lay = specs.layout(8, tp=2, pp=2, vpp=2, cp=2, layers=8, gbs=16, distributed_optimizer=False)
    first = estimate_memory(llama, specs.hardware(), lay, specs.training(2048)).stages[0]
    assert first.params == 4 * 109_060_096 + 262_668_288
    assert first.static == 20 * 698_908_672


@pytest.mark.parametrize("knobs", [
    dict(pp=4, layers=8),
    dict(pp=4, layers=7, stage_layers=(1, 2, 2, 2)),
    dict(pp=4, layers=6, noop=(6, 7)),
    dict(pp=2, vpp=2, layers=8),
])
def test_peak_candidates_give_the_same_peak(specs, knobs):
    m = specs.model(num_layers=knobs["layers"])
    lay = specs.layout(4, gbs=8, **knobs)
    full = estimate_memory(m, specs.hardware(), lay, specs.training())
    short = estimate_memory(m, specs.hardware(), lay, specs.training(), peak_candidates_only=True)
    assert short.peak == full.peak
    assert len(short.stages) <= len(full.stages)


def test_reference_logits_are_a_last_stage_transient(specs):
    # vocab 256: 8 tokens * 256 * (2 + 4) = 12,288 bytes of logits, more than a layer's 1,728
    (stage,) = estimate_memory(specs.model(vocab_size=256), specs.hardware(), specs.layout(1),
                               specs.training()).stages
    assert stage.logits == 12_288  # the policy's
    assert stage.transient == 12_288  # the reference's, before the policy's exist
