"""The architecture record: the shapes and constants of a decoder-only transformer, defined once.

The Plan's model (`plan.ModelSpec`, the record plus the names each tool knows the model by), the planner's
counts, the megatron.args model flags and the runtime's weight map all read this one record. Field names
follow Hugging Face configs where they exist; `of` builds it from the dict form that `hf_config`, presets
and plan.json's model section share.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

_Record = TypeVar("_Record", bound="Architecture")


@dataclass(frozen=True)
class MoESpec:
    """Routed experts in every layer, and how tokens are routed to them."""

    num_experts: int
    topk: int
    ffn_hidden_size: int
    aux_loss_coeff: float
    norm_topk_prob: bool
    shared_expert_ffn_hidden_size: int = 0
    load_balancing: str = "aux_loss"

    @classmethod
    def of(cls, raw: dict[str, Any]) -> MoESpec:
        """From the dict form; absent keys take the model schema's defaults."""
        return cls(num_experts=raw["num_experts"], topk=raw["topk"], ffn_hidden_size=raw["ffn_hidden_size"],
                   aux_loss_coeff=float(raw.get("aux_loss_coeff", 0.001)),
                   norm_topk_prob=raw.get("norm_topk_prob", True),
                   shared_expert_ffn_hidden_size=raw.get("shared_expert_ffn_hidden_size", 0),
                   load_balancing=raw.get("load_balancing", "aux_loss"))


@dataclass(frozen=True)
class Architecture:
    """What defines the model's tensors and their math: SwiGLU MLPs, RMSNorm, RoPE, grouped-query attention."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_base: float
    norm_epsilon: float
    qk_layernorm: bool
    qkv_bias: bool
    tie_embeddings: bool
    moe: MoESpec | None

    @property
    def num_experts(self) -> int:
        """Routed experts per layer (0: a dense model)."""
        return self.moe.num_experts if self.moe is not None else 0

    @classmethod
    def of(cls: type[_Record], arch: dict[str, Any], **names: Any) -> _Record:
        """From the dict form (other keys are ignored); `names` fill a subclass's own fields."""
        plain = {f.name: arch[f.name] for f in dataclasses.fields(Architecture) if f.name != "moe"}
        plain.update(rope_base=float(arch["rope_base"]), norm_epsilon=float(arch["norm_epsilon"]))
        moe = MoESpec.of(arch["moe"]) if arch.get("moe") else None
        return cls(**plain, moe=moe, **names)
