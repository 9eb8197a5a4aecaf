"""Parameter counts of a decoder layer and of one rank's shard, split by how each part is sharded.

All models dpoc knows use SwiGLU MLPs (gate, up and down projections) and RMSNorm; every layer of a model
with a `moe` section is an MoE layer. Counts follow Megatron's layer structure (formulas-and-anchors §1.1).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from functools import cache
from itertools import accumulate

from dpoc.contract.architecture import Architecture
from dpoc.contract.plan import Layout

SWIGLU_MATRICES = 3  # gate, up, down


@dataclass(eq=False, repr=False)  # an intermediate: not frozen, compared by identity, no repr (one method to compile)
class LayerParams:
    """Parameters of one transformer layer, by sharding group."""

    tensor_parallel: int  # attention projections, qkv bias, dense MLP or shared expert: split over tp
    replicated: int  # norms, qk-norms, router: a full copy on every rank
    experts: int  # routed experts: split over ep * etp


@dataclass(frozen=True)
class Shard:
    """Parameters one rank holds, split by the data-parallel group its optimizer state is sharded over."""

    dense: int  # sharded over dp * cp by the distributed optimizer
    experts: int  # sharded over the expert data-parallel group

    @property
    def total(self) -> int:
        return self.dense + self.experts


def q_width(model: Architecture) -> int:
    return model.num_attention_heads * model.head_dim


def kv_width(model: Architecture) -> int:
    return model.num_query_groups * model.head_dim


def attention_projection_params(model: Architecture) -> int:
    """Weights of the q, k, v and output projections (without biases)."""
    h, q, kv = model.hidden_size, q_width(model), kv_width(model)
    return h * (q + 2 * kv) + q * h


def mlp_params(hidden: int, ffn: int) -> int:
    """Weights of one SwiGLU MLP (a dense layer's, a shared expert's or one routed expert's)."""
    return SWIGLU_MATRICES * hidden * ffn


@cache
def layer_params(model: Architecture) -> LayerParams:
    h, q, kv = model.hidden_size, q_width(model), kv_width(model)
    attention = attention_projection_params(model) + ((q + 2 * kv) if model.qkv_bias else 0)
    norms = 2 * h + (2 * model.head_dim if model.qk_layernorm else 0)
    moe = model.moe
    if moe is None:
        return LayerParams(attention + mlp_params(h, model.ffn_hidden_size), norms, 0)
    shared = mlp_params(h, moe.shared_expert_ffn_hidden_size)
    routed = moe.num_experts * mlp_params(h, moe.ffn_hidden_size)
    return LayerParams(attention + shared, norms + h * moe.num_experts, routed)


def embedding_params(model: Architecture) -> int:
    return model.vocab_size * model.hidden_size


def matmul_params(model: Architecture) -> int:
    """The weights each token is multiplied by in a forward pass (2 FLOPs each): every layer's projections and
    MLP (of an MoE layer: its shared expert and top-k routed experts), and the LM head; embedding lookups,
    norms, biases and the router are left out."""
    h, moe = model.hidden_size, model.moe
    if moe is None:
        mlp = mlp_params(h, model.ffn_hidden_size)
    else:
        mlp = mlp_params(h, moe.shared_expert_ffn_hidden_size) + moe.topk * mlp_params(h, moe.ffn_hidden_size)
    return model.num_layers * (attention_projection_params(model) + mlp) + embedding_params(model)


def real_layers_per_stage(layout: Layout) -> tuple[int, ...]:
    """Transformer layers with weights per pipeline stage; no-op layers (padding to even stages) hold none.

    With interleaving (vpp > 1) stage i runs virtual chunks i, i + pp, i + 2pp, ... of equal size.
    """
    if not layout.noop_layers:
        return layout.stage_layers
    counts = list(layout.stage_layers)
    bounds = list(accumulate(layout.stage_layers))
    chunk = max(layout.stage_layers[0] // layout.vpp, 1)
    for index in set(layout.noop_layers):
        stage = bisect_right(bounds, index) if layout.vpp == 1 else index // chunk % layout.pp
        if stage < layout.pp:  # an index past the last layer is the rules' to report
            counts[stage] -= 1
    return tuple(counts)


def stage_shard(model: Architecture, layout: Layout, stage: int, layers: int) -> Shard:
    """Parameters on one rank of `stage` holding `layers` real layers (first stage: embedding; last: head)."""
    layer = layer_params(model)
    dense = layers * (layer.tensor_parallel // layout.tp + layer.replicated)
    experts = layers * layer.experts // (layout.ep * layout.etp)
    embedding = embedding_params(model) // layout.tp
    first, last = stage == 0, stage == layout.pp - 1
    if first:
        dense += embedding
    if last:
        dense += model.hidden_size  # final norm
        if not model.tie_embeddings or not first:
            dense += embedding  # untied head, or the tied copy the last stage keeps when pp > 1
    return Shard(dense, experts)


def layer_tensors(model: Architecture, layout: Layout) -> Shard:
    """Parameter tensors of one layer on a rank, as megatron-core's local layer spec holds them: the input and
    pre-MLP norms, the fused QKV projection (and its bias), the q/k norms, the output projection, and the dense
    MLP's fused gate/up and down projections, or the router, the shared expert's two and the rank's routed
    experts (two grouped weights, or two per local expert)."""
    dense = 2 + 1 + (1 if model.qkv_bias else 0) + (2 if model.qk_layernorm else 0) + 1
    moe = model.moe
    if moe is None:
        return Shard(dense + 2, 0)
    shared = 2 if moe.shared_expert_ffn_hidden_size else 0
    experts = 2 if layout.moe_grouped_gemm else 2 * (moe.num_experts // layout.ep)
    return Shard(dense + 1 + shared, experts)


def stage_tensors(model: Architecture, layout: Layout, stage: int, layers: int) -> Shard:
    """Parameter tensors on one rank of `stage` (first stage: the embedding; last: final norm and head)."""
    layer = layer_tensors(model, layout)
    dense = layers * layer.dense
    if stage == 0:
        dense += 1
    if stage == layout.pp - 1:
        dense += 1 + (1 if not model.tie_embeddings or stage != 0 else 0)
    return Shard(dense, layers * layer.experts)
