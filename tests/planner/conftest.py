"""Specs for the planner tests: toys small enough to count by hand, plus the Qwen3-30B-A3B preset."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from dpoc.compiler.resolve import rules
from dpoc.compiler.resolve.rules import Violation
from dpoc.contract.plan import DPO, HardwareSpec, Layout, ModelSpec, Training
from dpoc.contract.specs import preset_model
from dpoc.planner.layout import make_layout


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
    """The preset, optionally cut to fewer layers (MindSpeed's CI runs 4)."""
    return replace(preset_model("qwen3-30b-a3b"), num_layers=num_layers)


def hardware(**overrides: Any) -> HardwareSpec:
    """Atlas A3-like: 16 devices per node, 64 GiB, no HCCL buffers, no reserve, no per-call latency and no
    optimizer sweep time unless asked."""
    base: dict[str, Any] = dict(
        name="test", device="npu", backend="hccl", devices_per_node=16, nodes=1, memory_gib=64,
        reserved_gib=0.0, peak_tflops=353.9, intra_node_gbps=196, inter_node_gbps=25, superpod_nodes=0,
        superpod_gbps=25, hccl_buffsize_mb=0, env=(), op_latency_us=0.0,
        optimizer_tensor_us=0.0, memory_gbps=math.inf, collective_latency_us=10.0,
    )
    return HardwareSpec(**{**base, **overrides})


def layout(world: int, *, layers: int = 2, gbs: int = 8, mbs: int = 1, stage_layers: tuple[int, ...] | None = None,
           noop: tuple[int, ...] = (), **knobs: Any) -> Layout:
    """The compiler's `make_layout` for the toy with `layers` layers on `world` devices of one node; other
    keywords are layout knobs (tp, pp, ep, etp, vpp, recompute, ...)."""
    knobs.update(micro_batch_size=mbs, noop_layers=noop)
    if stage_layers is not None:
        knobs["num_layer_list"] = stage_layers
    return make_layout(model(num_layers=layers), hardware(devices_per_node=world), gbs, knobs)


def training(seq_length: int = 4, precision: str = "bf16", dynamic_padding: bool = False,
             packing: bool = False) -> Training:
    return Training(
        seq_length=seq_length, train_iters=1, lr=1e-6, min_lr=0.0, lr_decay_style="constant", warmup_iters=0,
        weight_decay=0.0, clip_grad=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, seed=1,
        precision=precision, dynamic_padding=dynamic_padding, save_interval=1, log_interval=1, packing=packing,
    )


def compiler_rules(model_spec: ModelSpec, hw: HardwareSpec, train: Training) -> Callable[[Layout], list[Violation]]:
    """The compiler's rules as the search's `validate`: the violations that are not warnings."""
    dpo = DPO(loss=("sigmoid",), beta=0.1, label_smoothing=0.0, sft_weight=0.0)

    def validate(lay: Layout) -> list[Violation]:
        return [v for v in rules.check(rules.Context(model_spec, hw, lay, train, dpo)) if not v.warning]
    return validate


@pytest.fixture
def specs():
    """The builders above, as one namespace for the tests."""
    class Specs:
        pass
    for f in (model, qwen3_30b_a3b, hardware, layout, training, compiler_rules):
        setattr(Specs, f.__name__, staticmethod(f))
    return Specs
