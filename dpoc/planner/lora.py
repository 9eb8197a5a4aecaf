"""What LoRA adds to and removes from a rank's load: the adapters' parameters, FLOPs and saved inputs.

Under LoRA the base is frozen: its linears run megatron-core's frozen-weight path, which saves no input and
computes no weight gradient (only the input gradient); each adapter (A `[r, in]`, B `[out, r]`) is sharded
as its weight is — on a column-parallel linear B is split over tp and A replicated, on a row-parallel one A
is split and B replicated — and trains in full. An adapter saves its input (the linear's input, which the
frozen base no longer saves; a copy and its mask when dropout applies) and A's output (r wide); on a
column-parallel linear under sequence parallelism that input is the gathered one the adapter reads (the
runtime's `dpoc/runtime/model/lora.py`), where a trained weight keeps its sequence shard. MoE layers
have no dense fc1/fc2: those targets adapt the routed experts, one adapter per expert, with `experts`.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpoc.contract.architecture import Architecture
from dpoc.contract.lora import COLUMN_PARALLEL, Lora
from dpoc.contract.plan import Layout
from dpoc.planner.params import Shard, kv_width, q_width

# kernel calls an adapter adds to a forward: A's matmul, B's matmul, the scaling, the add onto the base's
# output (and the dropout when it applies)
ADAPTER_CALLS = 4


@dataclass(eq=False, repr=False)  # an intermediate: not frozen, compared by identity, no repr (one method to compile)
class Linear:
    """One adapted linear of a layer, whole (before tensor parallelism)."""

    target: str  # megatron-core name
    inputs: int  # in_features
    outputs: int  # out_features
    expert: bool  # a routed expert's (copies: one per routed token; sharded over etp; one adapter per expert)


def adapted_linears(model: Architecture, lora: Lora) -> tuple[Linear, ...]:
    """The linears of one layer that carry an adapter (per expert: one of each expert's)."""
    h, q, kv = model.hidden_size, q_width(model), kv_width(model)
    moe = model.moe
    out = []
    for target in lora.targets:
        if target == "linear_qkv":
            out.append(Linear(target, h, q + 2 * kv, False))
        elif target == "linear_proj":
            out.append(Linear(target, q, h, False))
        elif moe is None:
            f = model.ffn_hidden_size
            out.append(Linear(target, h, 2 * f, False) if target == "linear_fc1" else Linear(target, f, h, False))
        elif lora.experts:
            f = moe.ffn_hidden_size
            out.append(Linear(target, h, 2 * f, True) if target == "linear_fc1" else Linear(target, f, h, True))
    return tuple(out)


def _split(linear: Linear, layout: Layout) -> int:
    return layout.etp if linear.expert else layout.tp


def layer_adapter_params(model: Architecture, layout: Layout, lora: Lora) -> Shard:
    """Adapter parameters of one layer on one rank: A and B, each split as its weight is; a rank holds
    num_experts / ep experts' adapters."""
    dense = experts = 0
    for linear in adapted_linears(model, lora):
        split = _split(linear, layout)
        if linear.target in COLUMN_PARALLEL:
            params = lora.rank * (linear.inputs + linear.outputs // split)
        else:
            params = lora.rank * (linear.inputs // split + linear.outputs)
        if linear.expert:
            experts += params * model.num_experts // layout.ep
        else:
            dense += params
    return Shard(dense, experts)


def layer_adapter_tensors(model: Architecture, layout: Layout, lora: Lora) -> Shard:
    """Adapter parameter tensors of one layer on one rank: an A and a B per adapter."""
    linears = adapted_linears(model, lora)
    dense = sum(2 for linear in linears if not linear.expert)
    experts = sum(2 * model.num_experts // layout.ep for linear in linears if linear.expert)
    return Shard(dense, experts)


def adapter_forward_flops(model: Architecture, lora: Lora, tokens: float) -> tuple[float, float]:
    """(dense, experts) forward FLOPs of one layer's adapters for `tokens` tokens, all ranks together:
    2·r·(in + out) per token and adapter; an expert's adapters see the top-k copies of the tokens."""
    dense = experts = 0.0
    for linear in adapted_linears(model, lora):
        flops = 2 * lora.rank * (linear.inputs + linear.outputs) * tokens
        if linear.expert:
            experts += flops * model.moe.topk
        else:
            dense += flops
    return dense, experts


def adapts(lora: Lora, target: str, expert: bool = False) -> bool:
    """Whether `target` (a routed expert's with `expert`) carries an adapter."""
    return target in lora.targets and (lora.experts or not expert)


def input_bytes(lora: Lora | None, target: str, element: int, expert: bool = False) -> float:
    """Bytes per element of `target`'s input that backward keeps: its weight gradient needs it in full
    training; under LoRA only an adapter does (with dropout, the dropped copy and its one-byte mask)."""
    if lora is None:
        return element
    if not adapts(lora, target, expert):
        return 0.0
    return element + (1 if lora.dropout else 0)


def rank_width(lora: Lora | None, target: str, expert: bool = False) -> int:
    """Elements per token an adapter on `target` saves beyond its input: A's output, B's input."""
    return lora.rank if lora is not None and adapts(lora, target, expert) else 0


def stage_adapters(model: Architecture, layout: Layout, lora: Lora, layers: int, tensors: bool = False) -> Shard:
    """Adapter parameters (`tensors`: parameter tensors) on one rank of a stage with `layers` layers."""
    per_layer = (layer_adapter_tensors if tensors else layer_adapter_params)(model, layout, lora)
    return Shard(layers * per_layer.dense, layers * per_layer.experts)
