"""Model and hardware specs from their YAML form (a preset file or a recipe section), in one place.

`resolve` builds the Plan's specs through these; the planner's calibration builds published systems from
the same presets, so a preset number exists once.
"""

from __future__ import annotations

from typing import Any

from dpoc.contract.family import CONVERTER
from dpoc.contract.plan import HardwareSpec, ModelSpec


def model_spec(name: str, m: dict[str, Any]) -> ModelSpec:
    return ModelSpec.of(m, name=name, family=m["family"], mindspeed_name=m["mindspeed_name"],
                        converter=CONVERTER[m["family"]], hf_model_type=m["hf_model_type"])


def hardware_spec(name: str, h: dict[str, Any], nodes: int | None = None) -> HardwareSpec:
    return HardwareSpec(
        name=name, device=h["device"], backend=h["backend"], devices_per_node=h["devices_per_node"],
        nodes=h["nodes"] if nodes is None else nodes, memory_gib=float(h["memory_gib"]),
        reserved_gib=float(h["reserved_gib"]), peak_tflops=float(h["peak_tflops"]),
        intra_node_gbps=float(h["intra_node_gbps"]), inter_node_gbps=float(h["inter_node_gbps"]),
        superpod_nodes=h["superpod_nodes"], superpod_gbps=float(h["superpod_gbps"]),
        hccl_buffsize_mb=h["hccl_buffsize_mb"], env=tuple(sorted(h["env"].items())),
        op_latency_us=float(h["op_latency_us"]), optimizer_tensor_us=float(h["optimizer_tensor_us"]),
        memory_gbps=float(h["memory_gbps"]), collective_latency_us=float(h["collective_latency_us"]),
    )


def preset_model(name: str) -> ModelSpec:
    return model_spec(name, _preset("models", name))


def preset_hardware(name: str, nodes: int = 1) -> HardwareSpec:
    return hardware_spec(name, _preset("hardware", name), nodes)


def _preset(catalog: str, name: str) -> dict[str, Any]:
    import yaml

    from dpoc.contract import resources

    return yaml.safe_load((resources.preset_dir(catalog) / f"{name}.yaml").read_text())
