"""Specs built by hand for the planner tests: small enough to count, plus the published Qwen3 shapes."""

from __future__ import annotations

from typing import Any

import pytest

from dpoc.plan import HardwareSpec, Layout, ModelSpec, MoESpec, Training


def model(**overrides: Any) -> ModelSpec:
    """A dense toy: h 8, 2 layers, 2 heads of 4 (q = h), 1 KV group, FFN 16, vocab 32, untied."""
    base: dict[str, Any] = dict(
        name="toy", family="qwen3", num_layers=2, hidden_size=8, ffn_hidden_size=16,
        num_attention_heads=2, num_query_groups=1, head_dim=4, vocab_size=32,
        max_position_embeddings=64, rope_base=1e6, norm_epsilon=1e-6, qk_layernorm=False,
        qkv_bias=False, tie_embeddings=False, moe=None, mindspeed_name="toy", converter="v2",
        hf_model_type="qwen3",
    )
    return ModelSpec(**{**base, **overrides})


def qwen3_30b_a3b(num_layers: int = 48) -> ModelSpec:
    moe = MoESpec(num_experts=128, topk=8, ffn_hidden_size=768, aux_loss_coeff=0.001, norm_topk_prob=True)
    return model(
        name="qwen3-30b-a3b", family="qwen3_moe", num_layers=num_layers, hidden_size=2048,
        ffn_hidden_size=6144, num_attention_heads=32, num_query_groups=4, head_dim=128,
        vocab_size=151936, max_position_embeddings=40960, qk_layernorm=True, moe=moe,
    )


def hardware(**overrides: Any) -> HardwareSpec:
    """Atlas A3-like: 16 devices per node, 64 GiB, no HCCL buffers and no reserve unless asked."""
    base: dict[str, Any] = dict(
        name="test", device="npu", backend="hccl", devices_per_node=16, nodes=1, memory_gib=64,
        reserved_gib=0.0, peak_tflops=353.9, intra_node_gbps=196, inter_node_gbps=25, superpod_nodes=0,
        superpod_gbps=25, hccl_buffsize_mb=0, env=(),
    )
    return HardwareSpec(**{**base, **overrides})


def layout(world: int, *, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1, etp: int | None = None,
           vpp: int = 1, mbs: int = 1, gbs: int = 8, layers: int = 2, recompute: str = "none",
           recompute_method: str | None = None, recompute_num_layers: int | None = None,
           stage_layers: tuple[int, ...] | None = None, noop: tuple[int, ...] = (),
           distributed_optimizer: bool = True, sequence_parallel: bool | None = None) -> Layout:
    etp = tp if etp is None else etp
    dp = world // (tp * pp * cp)
    total = layers + len(noop)
    return Layout(
        world_size=world, tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, etp=etp, dp=dp, edp=world // (etp * ep * pp),
        sequence_parallel=tp > 1 if sequence_parallel is None else sequence_parallel,
        micro_batch_size=mbs, global_batch_size=gbs, num_microbatches=gbs // (mbs * dp) if dp else 0,
        recompute=recompute, recompute_method=recompute_method, recompute_num_layers=recompute_num_layers,
        num_layer_list=stage_layers, noop_layers=noop,
        stage_layers=stage_layers or (total // pp,) * pp, distributed_optimizer=distributed_optimizer,
        moe_dispatcher=None, moe_grouped_gemm=False, moe_permutation_async_comm=False,
        moe_alltoall_overlap_comm=False, moe_tp_extend_ep=False, moe_mc2=False,
    )


def training(seq_length: int = 4, precision: str = "bf16", dynamic_padding: bool = False) -> Training:
    return Training(
        seq_length=seq_length, train_iters=1, lr=1e-6, min_lr=0.0, lr_decay_style="constant", warmup_iters=0,
        weight_decay=0.0, clip_grad=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, seed=1,
        precision=precision, dynamic_padding=dynamic_padding, save_interval=1, log_interval=1,
    )


@pytest.fixture
def specs():
    """The builders above, as one namespace for the tests."""
    class Specs:
        pass
    for f in (model, qwen3_30b_a3b, hardware, layout, training, build):
        setattr(Specs, f.__name__, staticmethod(f))
    return Specs


def build(model_spec: ModelSpec, hw: HardwareSpec, global_batch_size: int, knobs: dict[str, Any]) -> Layout:
    """The compiler's knobs -> Layout step, reduced to the knobs the planner tests use."""
    names = {"micro_batch_size": "mbs", "num_layer_list": "stage_layers", "noop_layers": "noop"}
    args = {names.get(k, k): v for k, v in knobs.items()}
    return layout(hw.world_size, gbs=global_batch_size, layers=model_spec.num_layers, **args)
