"""Hugging Face `config.json` ⇄ dpoc's architecture (the model section's fields), and the check that weights
fit a job. Pure and torch-free: `dpoc build` reads a config through it, the node preflight and the runtime
check one against `megatron.args` with the same function.

Families: Qwen3 (`qwen3`), Qwen3-MoE (`qwen3_moe`), Qwen2/2.5 (`qwen2`), Llama-3 (`llama`). What
megatron-core's local GPT layers cannot build the same way (rope scaling, sliding windows, biases beyond
Qwen2's q/k/v, dense layers inside an MoE stack, other activations) is refused, naming the config field.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpoc.contract.architecture import Architecture
from dpoc.contract.errors import DpocError, Problem
from dpoc.contract.megatron_args import model_args

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe")
_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "qwen3_moe": "Qwen3MoeForCausalLM"}
_QK_NORM = ("qwen3", "qwen3_moe")
_DEFAULT_ROPE_THETA = 10000.0


def config_path(hf_dir: str | Path) -> str:
    """`<hf_dir>/config.json` spelled as the user spelled the directory (messages quote it)."""
    return os.path.join(str(hf_dir), "config.json")


def read_config(hf_dir: str | Path, field: str, context: str) -> dict[str, Any]:
    """`<hf_dir>/config.json` as a dict; a missing or unreadable file is a problem of `field` in `context`."""
    path = Path(config_path(hf_dir))
    if not Path(hf_dir).is_dir():
        raise DpocError([Problem(context, field, f"{hf_dir} is not a directory (expected Hugging Face weights: "
                                 "config.json and *.safetensors)")])
    try:
        config = json.loads(path.read_text())
    except OSError as exc:
        raise DpocError([Problem(context, field, f"cannot read {config_path(hf_dir)}: {exc.strerror}")]) from None
    except ValueError as exc:
        raise DpocError([Problem(config_path(hf_dir), "(file)", f"not valid JSON: {exc}")]) from None
    if not isinstance(config, dict):
        raise DpocError([Problem(config_path(hf_dir), "(file)", "a config.json is a JSON object")])
    return config


def rope_theta(config: dict[str, Any]) -> float:
    """transformers 5 keeps rope settings in `rope_parameters`; older configs have top-level `rope_theta`."""
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", _DEFAULT_ROPE_THETA)))


def architecture(config: dict[str, Any], shown: str) -> dict[str, Any]:
    """The model-section fields (ModelSpec names, without the MindSpeed names) a config.json describes.

    `shown` names the file in problems. Refuses what the dpoc runtime cannot build identically."""
    family = config.get("model_type")
    if family not in FAMILIES:
        raise DpocError([Problem(shown, "model_type", f"{family!r} is not a supported architecture "
                                 f"(valid: {', '.join(FAMILIES)})")])
    problems = _unsupported(config, family, shown)
    if problems:
        raise DpocError(problems)
    heads = config["num_attention_heads"]
    arch: dict[str, Any] = {
        "family": family,
        "num_layers": config["num_hidden_layers"],
        "hidden_size": config["hidden_size"],
        "ffn_hidden_size": config["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "vocab_size": config["vocab_size"],
        "max_position_embeddings": config["max_position_embeddings"],
        "rope_base": rope_theta(config),
        "norm_epsilon": float(config["rms_norm_eps"]),
        "qk_layernorm": family in _QK_NORM,
        "qkv_bias": family == "qwen2",
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
    }
    if family == "qwen3_moe":
        arch["moe"] = {
            "num_experts": config.get("num_experts", config.get("num_local_experts")),
            "topk": config["num_experts_per_tok"],
            "ffn_hidden_size": config["moe_intermediate_size"],
            "aux_loss_coeff": float(config.get("router_aux_loss_coef", 0.001)),
            "norm_topk_prob": bool(config.get("norm_topk_prob", False)),
            "shared_expert_ffn_hidden_size": config.get("shared_expert_intermediate_size") or 0,
        }
    return arch


def _unsupported(config: dict[str, Any], family: str, shown: str) -> list[Problem]:
    out = []

    def refuse(key: str, why: str) -> None:
        out.append(Problem(shown, key, f"{json.dumps(config.get(key))}: {why}"))

    if config.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "the runtime builds SwiGLU MLPs (valid: silu)")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        refuse("rope_parameters", "rope scaling is not supported (valid: rope_type default)")
    if config.get("rope_scaling"):
        refuse("rope_scaling", "rope scaling is not supported (valid: null)")
    if config.get("use_sliding_window"):
        refuse("use_sliding_window", "sliding-window attention is not supported (valid: false)")
    if family != "qwen2" and config.get("attention_bias"):
        refuse("attention_bias", "biases on q/k/v/o projections are not supported for this family (valid: false)")
    if config.get("mlp_bias"):
        refuse("mlp_bias", "MLP biases are not supported (valid: false)")
    if family == "qwen3_moe":
        if config.get("decoder_sparse_step", 1) != 1:
            refuse("decoder_sparse_step", "every layer must be an MoE layer (valid: 1)")
        if config.get("mlp_only_layers"):
            refuse("mlp_only_layers", "every layer must be an MoE layer (valid: [])")
    return out


def hf_config(arch: dict[str, Any], dtype: str) -> dict[str, Any]:
    """A config.json for an architecture (the inverse of `architecture`), with the weights' `dtype`."""
    family = arch["family"]
    config: dict[str, Any] = {
        "architectures": [_HF_CLASS[family]],
        "model_type": family,
        "num_hidden_layers": arch["num_layers"],
        "hidden_size": arch["hidden_size"],
        "intermediate_size": arch["ffn_hidden_size"],
        "num_attention_heads": arch["num_attention_heads"],
        "num_key_value_heads": arch["num_query_groups"],
        "head_dim": arch["head_dim"],
        "vocab_size": arch["vocab_size"],
        "max_position_embeddings": arch["max_position_embeddings"],
        "rope_parameters": {"rope_theta": float(arch["rope_base"]), "rope_type": "default"},
        "rms_norm_eps": arch["norm_epsilon"],
        "tie_word_embeddings": arch["tie_embeddings"],
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "dtype": dtype,
    }
    if family != "qwen2":
        config["attention_bias"] = False
    moe = arch.get("moe")
    if moe:
        config.update({
            "num_experts": moe["num_experts"],
            "num_experts_per_tok": moe["topk"],
            "moe_intermediate_size": moe["ffn_hidden_size"],
            "norm_topk_prob": moe["norm_topk_prob"],
            "router_aux_loss_coef": moe["aux_loss_coeff"],
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        })
    return config


def model_flags(arch: dict[str, Any]) -> list[tuple[str, object]]:
    """megatron.args' model flags for an architecture: the compiler's own (megatron_args.model_args)."""
    return model_args(Architecture.of(arch))


def mindspeed_name(hf_dir: str) -> str:
    """A MindSpeed-RL model key for weights known only by their directory: its name, lower-case, [a-z0-9_]."""
    name = os.path.basename(os.path.normpath(hf_dir)).lower()
    return "".join(c if c.isalnum() and c.isascii() else "_" for c in name) or "model"


def architecture_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """What megatron.args (parsed by dpoc.contract.megatron_args) says the architecture is, in the same fields."""
    heads = args.num_attention_heads
    arch: dict[str, Any] = {
        "num_layers": args.num_layers,
        "hidden_size": args.hidden_size,
        "ffn_hidden_size": args.ffn_hidden_size,
        "num_attention_heads": heads,
        "num_query_groups": args.num_query_groups if args.group_query_attention else heads,
        "head_dim": args.kv_channels or args.hidden_size // heads,
        "vocab_size": args.padded_vocab_size,
        "max_position_embeddings": args.max_position_embeddings,
        "rope_base": float(args.rotary_base),
        "norm_epsilon": args.norm_epsilon,
        "qk_layernorm": args.qk_layernorm,
        "qkv_bias": args.add_qkv_bias,
        "tie_embeddings": not args.untie_embeddings_and_output_weights,
        "moe": None,
    }
    if args.num_experts:
        arch["moe"] = {"num_experts": args.num_experts, "topk": args.moe_router_topk,
                       "ffn_hidden_size": args.moe_ffn_hidden_size, "aux_loss_coeff": args.moe_aux_loss_coeff,
                       "norm_topk_prob": not args.moe_router_pre_softmax,
                       "shared_expert_ffn_hidden_size": args.moe_shared_expert_intermediate_size or 0}
    return arch


@dataclass(frozen=True)
class _Check:
    field: str  # architecture field
    hf_key: str  # where config.json says it
    flag: str  # where megatron.args says it
    switch: str = ""  # "on"/"off": a store_true flag that says the field is true/false

    def args_side(self, value: Any) -> str:
        if value is None:
            return f"no {self.flag}"
        if self.switch:
            return self.flag if value == (self.switch == "on") else f"no {self.flag}"
        return f"{self.flag} {value:g}" if isinstance(value, float) else f"{self.flag} {value}"

    def hf_side(self, config: dict[str, Any], value: Any) -> str:
        if self.hf_key == "model_type":  # a property of the family
            return f"{json.dumps(config['model_type'])} ({'with' if value else 'without'} {self.field})"
        return f"{value:g}" if isinstance(value, float) else json.dumps(config.get(self.hf_key, value))


_CHECKS = (
    _Check("num_layers", "num_hidden_layers", "--num-layers"),
    _Check("hidden_size", "hidden_size", "--hidden-size"),
    _Check("ffn_hidden_size", "intermediate_size", "--ffn-hidden-size"),
    _Check("num_attention_heads", "num_attention_heads", "--num-attention-heads"),
    _Check("num_query_groups", "num_key_value_heads", "--num-query-groups"),
    _Check("head_dim", "head_dim", "--kv-channels"),
    _Check("vocab_size", "vocab_size", "--padded-vocab-size"),
    _Check("rope_base", "rope_theta", "--rotary-base"),
    _Check("norm_epsilon", "rms_norm_eps", "--norm-epsilon"),
    _Check("qk_layernorm", "model_type", "--qk-layernorm", "on"),
    _Check("qkv_bias", "model_type", "--add-qkv-bias", "on"),
    _Check("tie_embeddings", "tie_word_embeddings", "--untie-embeddings-and-output-weights", "off"),
)
_EXPERTS = _Check("num_experts", "num_experts", "--num-experts")
_MOE_CHECKS = (
    _EXPERTS,
    _Check("topk", "num_experts_per_tok", "--moe-router-topk"),
    _Check("ffn_hidden_size", "moe_intermediate_size", "--moe-ffn-hidden-size"),
    _Check("norm_topk_prob", "norm_topk_prob", "--moe-router-pre-softmax", "off"),
    _Check("shared_expert_ffn_hidden_size", "shared_expert_intermediate_size", "--moe-shared-expert-intermediate-size"),
)


def mismatches(args: argparse.Namespace, hf_dir: str | Path, args_file: str, field: str = "(directory)"
               ) -> list[Problem]:
    """Every architecture field where `<hf_dir>/config.json` and megatron.args disagree (see
    `config_mismatches`); a missing or unreadable config.json is raised as a problem of `field`."""
    config = read_config(hf_dir, field, args_file)
    return config_mismatches(config, config_path(hf_dir), args, args_file)


def config_mismatches(config: dict[str, Any], shown: str, args: argparse.Namespace, args_file: str
                      ) -> list[Problem]:
    """One line per field where a config.json (`shown` names it) and megatron.args disagree: the file, its
    field, and both values."""
    found, expected = architecture(config, shown), architecture_from_args(args)
    pairs = [(c, found[c.field], expected[c.field]) for c in _CHECKS]
    found_moe, expected_moe = found.get("moe"), expected["moe"]
    if found_moe and expected_moe:
        pairs += [(c, found_moe[c.field], expected_moe[c.field]) for c in _MOE_CHECKS]
    elif found_moe or expected_moe:
        pairs.append((_EXPERTS, (found_moe or {}).get("num_experts", 0), (expected_moe or {}).get("num_experts")))
    return [Problem(shown, c.hf_key, f"{c.hf_side(config, value)} does not match {c.args_side(wanted)} in {args_file}")
            for c, value, wanted in pairs if value != wanted]
