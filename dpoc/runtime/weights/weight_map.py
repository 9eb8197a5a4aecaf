"""Which Hugging Face rows make up each megatron-core tensor, in the distributed checkpoint's global coordinates.

megatron-core's `GPTModel.sharded_state_dict()` names every weight by a layout-free key
(`decoder.layers.self_attention.linear_qkv.weight`) with leading *index axes* — the global layer, and for
routed experts the global expert — followed by the tensor's own axes in global shape. This module says, for
one key at one index, which HF tensors' rows are concatenated along axis 0 to give that global tensor:

- QKV: per query group, its q heads, then its k head, then its v head (what `get_query_key_value_tensors`
  splits back out); the q/k/v biases likewise;
- SwiGLU fc1: `[gate; up]` (megatron stores the TP-sharded halves so that the global tensor is exactly this);
- everything else: one HF tensor, whole.

Loading (each rank slices out its part) and both conversions read this one table; it is pure (no torch).
The local layer spec renames the norms: `input_layernorm` → `self_attention.linear_qkv.layer_norm_weight`,
`pre_mlp_layernorm` → `mlp.linear_fc1.layer_norm_weight`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from dpoc.contract.architecture import Architecture

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"
LAYER = "decoder.layers."
EXPERT = "decoder.layers.mlp.experts.experts."
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")  # GPTModel's top-level modules


@dataclass(frozen=True)
class Piece:
    """Rows [start, start + rows) of HF tensor `name`; a megatron tensor is its pieces stacked on axis 0."""

    name: str
    start: int
    rows: int


def index_axes(key: str) -> int:
    """How many leading axes of `key`'s global tensor are indices: 2 for routed experts (layer, expert), 1 for
    other layer weights, 0 for the embedding, final norm and output layer."""
    if key.startswith(EXPERT):
        return 2
    return 1 if key.startswith(LAYER) else 0


def hf_tensors(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the architecture has, with its shape, in Hugging Face's order."""
    h, hn = arch.hidden_size, arch.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab_size, h)}
    for layer in range(arch.num_layers):
        p = f"model.layers.{layer}."
        out[p + "input_layernorm.weight"] = (h,)
        for proj, heads in (("q", arch.num_attention_heads), ("k", arch.num_query_groups),
                            ("v", arch.num_query_groups)):
            out[f"{p}self_attn.{proj}_proj.weight"] = (heads * hn, h)
            if arch.qkv_bias:
                out[f"{p}self_attn.{proj}_proj.bias"] = (heads * hn,)
        if arch.qk_layernorm:
            out[p + "self_attn.q_norm.weight"] = (hn,)
            out[p + "self_attn.k_norm.weight"] = (hn,)
        out[p + "self_attn.o_proj.weight"] = (h, arch.num_attention_heads * hn)
        out[p + "post_attention_layernorm.weight"] = (h,)
        if arch.moe is not None:
            out[p + "mlp.gate.weight"] = (arch.moe.num_experts, h)
            for expert in range(arch.moe.num_experts):
                out.update(_mlp(f"{p}mlp.experts.{expert}.", h, arch.moe.ffn_hidden_size))
        else:
            out.update(_mlp(p + "mlp.", h, arch.ffn_hidden_size))
    out["model.norm.weight"] = (h,)
    if not arch.tie_embeddings:
        out["lm_head.weight"] = (arch.vocab_size, h)
    return out


def _mlp(prefix: str, hidden: int, ffn: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "gate_proj.weight": (ffn, hidden), prefix + "up_proj.weight": (ffn, hidden),
            prefix + "down_proj.weight": (hidden, ffn)}


def units(arch: Architecture) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every (key, index) of the model's weights: what its sharded state dict holds, at any layout."""
    yield EMBEDDING, ()
    for layer in range(arch.num_layers):
        for name in _layer_keys(arch):
            yield LAYER + name, (layer,)
        for expert in range(arch.num_experts):
            for name in _EXPERT:
                yield EXPERT + name, (layer, expert)
    yield FINAL_NORM, ()
    if not arch.tie_embeddings:
        yield OUTPUT, ()


def _layer_keys(arch: Architecture) -> list[str]:
    keys = ["self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.weight"]
    if arch.qkv_bias:
        keys.append("self_attention.linear_qkv.bias")
    if arch.qk_layernorm:
        keys += ["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"]
    keys += ["self_attention.linear_proj.weight", "mlp.linear_fc1.layer_norm_weight"]
    keys += ["mlp.router.weight"] if arch.num_experts else ["mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    return keys


def pieces(key: str, index: tuple[int, ...], arch: Architecture) -> tuple[Piece, ...]:
    """The HF rows whose concatenation is the global tensor of `key` at `index`. KeyError: not a model weight."""
    shapes = hf_tensors(arch)

    def whole(name: str) -> tuple[Piece, ...]:
        return (Piece(name, 0, shapes[name][0]),)

    if not index:
        return whole({EMBEDDING: "model.embed_tokens.weight", FINAL_NORM: "model.norm.weight",
                      OUTPUT: "lm_head.weight" if not arch.tie_embeddings else "model.embed_tokens.weight"}[key])
    layer = f"model.layers.{index[0]}."
    if key.startswith(EXPERT):
        expert = f"{layer}mlp.experts.{index[1]}."
        rule = _EXPERT[key.removeprefix(EXPERT)]
        return _glu(expert, shapes) if rule == "glu" else whole(expert + rule)
    rule = _LAYER[key.removeprefix(LAYER)]
    if rule == "glu":
        return _glu(layer + "mlp.", shapes)
    if rule.startswith("qkv."):
        return _qkv(layer, rule.removeprefix("qkv."), arch)
    return whole(layer + rule)


def hf_shape(key: str, index: tuple[int, ...], arch: Architecture) -> tuple[int, ...]:
    """The global shape of `key` at `index` (without the index axes): its pieces' rows, their other axes."""
    parts = pieces(key, index, arch)
    return (sum(p.rows for p in parts), *hf_tensors(arch)[parts[0].name][1:])


def _glu(prefix: str, shapes: dict[str, tuple[int, ...]]) -> tuple[Piece, ...]:
    gate, up = prefix + "gate_proj.weight", prefix + "up_proj.weight"
    return Piece(gate, 0, shapes[gate][0]), Piece(up, 0, shapes[up][0])


def _qkv(layer: str, what: str, arch: Architecture) -> tuple[Piece, ...]:
    hn, per_group = arch.head_dim, arch.num_attention_heads // arch.num_query_groups
    out = []
    for g in range(arch.num_query_groups):
        out += [Piece(f"{layer}self_attn.q_proj.{what}", g * per_group * hn, per_group * hn),
                Piece(f"{layer}self_attn.k_proj.{what}", g * hn, hn),
                Piece(f"{layer}self_attn.v_proj.{what}", g * hn, hn)]
    return tuple(out)


# layer key (after `decoder.layers.`) -> HF name after `model.layers.<l>.`, or how it is composed
_LAYER = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.weight": "qkv.weight",
    "self_attention.linear_qkv.bias": "qkv.bias",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.weight": "glu",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "mlp.router.weight": "mlp.gate.weight",
}
_EXPERT = {"linear_fc1.weight": "glu", "linear_fc2.weight": "down_proj.weight"}
