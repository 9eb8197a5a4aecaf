"""Model and hardware specs from their YAML form (a preset file or a recipe section), in one place.

`resolve` builds the Plan's specs through these; the planner's calibration builds published systems from
the same presets, so a preset number exists once.
"""

from __future__ import annotations

from typing import Any

from dpoc.contract.family import CONVERTER
from dpoc.contract.plan import HardwareSpec, ModelSpec, MoESpec


def model_spec(name: str, m: dict[str, Any]) -> ModelSpec:
    moe = None
    if m.get("moe"):
        raw = m["moe"]
        moe = MoESpec(
            num_experts=raw["num_experts"], topk=raw["topk"], ffn_hidden_size=raw["ffn_hidden_size"],
            aux_loss_coeff=float(raw.get("aux_loss_coeff", 0.001)), norm_topk_prob=raw.get("norm_topk_prob", True),
            shared_expert_ffn_hidden_size=raw.get("shared_expert_ffn_hidden_size", 0),
            load_balancing=raw.get("load_balancing", "aux_loss"),
        )
    return ModelSpec(
        name=name, family=m["family"], num_layers=m["num_layers"], hidden_size=m["hidden_size"],
        ffn_hidden_size=m["ffn_hidden_size"], num_attention_heads=m["num_attention_heads"],
        num_query_groups=m["num_query_groups"], head_dim=m["head_dim"], vocab_size=m["vocab_size"],
        max_position_embeddings=m["max_position_embeddings"], rope_base=float(m["rope_base"]),
        norm_epsilon=float(m["norm_epsilon"]), qk_layernorm=m["qk_layernorm"], qkv_bias=m["qkv_bias"],
        tie_embeddings=m["tie_embeddings"], moe=moe, mindspeed_name=m["mindspeed_name"],
        converter=CONVERTER[m["family"]], hf_model_type=m["hf_model_type"],
    )


def hardware_spec(name: str, h: dict[str, Any], nodes: int | None = None) -> HardwareSpec:
    return HardwareSpec(
        name=name, device=h["device"], backend=h["backend"], devices_per_node=h["devices_per_node"],
        nodes=h["nodes"] if nodes is None else nodes, memory_gib=float(h["memory_gib"]),
        reserved_gib=float(h["reserved_gib"]), peak_tflops=float(h["peak_tflops"]),
        intra_node_gbps=float(h["intra_node_gbps"]), inter_node_gbps=float(h["inter_node_gbps"]),
        superpod_nodes=h["superpod_nodes"], superpod_gbps=float(h["superpod_gbps"]),
        hccl_buffsize_mb=h["hccl_buffsize_mb"], env=tuple(sorted(h["env"].items())),
        op_latency_us=float(h["op_latency_us"]), optimizer_tensor_us=float(h["optimizer_tensor_us"]),
        memory_gbps=float(h["memory_gbps"]),
    )


def preset_model(name: str) -> ModelSpec:
    return model_spec(name, _preset("models", name))


def preset_hardware(name: str, nodes: int = 1) -> HardwareSpec:
    return hardware_spec(name, _preset("hardware", name), nodes)


def _preset(catalog: str, name: str) -> dict[str, Any]:
    import yaml

    from dpoc.contract import resources

    return yaml.safe_load((resources.preset_dir(catalog) / f"{name}.yaml").read_text())
