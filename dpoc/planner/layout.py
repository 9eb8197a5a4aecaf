"""Build a `Layout` from the knobs a user (or the planner) pins, filling every other knob with its default.

One function serves `resolve` and the planner's search, so a layout means the same thing everywhere. It never
raises on an impossible combination: the rules in `dpoc.compiler.resolve.rules` judge the result and say what to change.
"""

from __future__ import annotations

from typing import Any

from dpoc.contract.kernels import experts_path
from dpoc.contract.plan import HardwareSpec, Layout, ModelSpec

# knob -> why its default is what it is (shown by `dpoc explain`)
DEFAULT_WHY = {
    "tp": "no tensor parallelism unless pinned (the planner chooses with parallelism: auto)",
    "pp": "no pipeline parallelism unless pinned",
    "vpp": "no interleaved pipeline unless pinned",
    "cp": "no context parallelism unless pinned",
    "ep": "no expert parallelism unless pinned",
    "etp": "expert tensor parallel = tp, as Megatron and MindSpeed default it (always written out explicitly)",
    "sequence_parallel": "on exactly when tp > 1: it shards activations at no extra communication",
    "micro_batch_size": "one pair per micro-batch: the DPO setting MindSpeed validates",
    "recompute": "no activation recompute unless pinned",
    "recompute_method": "full recompute checkpoints layers uniformly",
    "recompute_num_layers": "full recompute: one layer per checkpoint",
    "num_layer_list": "an even split of the layers over pipeline stages unless a list is given",
    "noop_layers": "no placeholder layers unless given",
    "distributed_optimizer": "shards optimizer states over data-parallel ranks (needed to resume MindSpeed-LLM runs)",
    "moe_dispatcher": "alltoall: the token dispatcher both targets implement",
    "moe_grouped_gemm": "grouped GEMM kernels on npu/cuda for MoE models, none on cpu",
    "moe_permutation_async_comm": "off, as MindSpeed-RL's DPO config sets it",
    "moe_alltoall_overlap_comm": "off unless pinned",
    "moe_tp_extend_ep": "off unless pinned (must match the weight conversion)",
    "swap_attention": "off unless pinned (MindSpeed: attention's saved activations kept in host memory)",
    "cp_algo": "ring: each rank's load-balanced chunks exchange keys and values around the cp group (both "
               "targets); ulysses, MindSpeed's all-to-all over heads, on request (runtime mindspeed-rl)",
}


def defaults(model: ModelSpec, hardware: HardwareSpec, knobs: dict[str, Any]) -> dict[str, Any]:
    """The value of every knob not in `knobs`."""
    tp = knobs.get("tp", 1)
    moe = model.moe is not None
    recompute = knobs.get("recompute", "none")
    return {
        "tp": 1, "pp": 1, "vpp": 1, "cp": 1, "ep": 1, "etp": tp,
        "sequence_parallel": tp > 1,
        "micro_batch_size": 1,
        "recompute": "none",
        "recompute_method": "uniform" if recompute == "full" else None,
        "recompute_num_layers": 1 if recompute == "full" else None,
        "num_layer_list": None,
        "noop_layers": (),
        "distributed_optimizer": True,
        "moe_dispatcher": "alltoall" if moe else None,
        "moe_grouped_gemm": moe and hardware.device != "cpu",
        "moe_permutation_async_comm": False,
        "moe_alltoall_overlap_comm": False,
        "moe_tp_extend_ep": False,
        "swap_attention": False,
        "cp_algo": "ring",
    }


def make_layout(model: ModelSpec, hardware: HardwareSpec, global_batch_size: int, knobs: dict[str, Any]) -> Layout:
    k = {**defaults(model, hardware, knobs), **knobs}
    world = hardware.world_size
    tp, pp, cp, ep, etp = k["tp"], k["pp"], k["cp"], k["ep"], k["etp"]
    dp = world // (tp * pp * cp)
    noop = tuple(k["noop_layers"])
    layer_list = tuple(k["num_layer_list"]) if k["num_layer_list"] is not None else None
    layers = model.num_layers + len(noop)
    stage_layers = layer_list if layer_list is not None else (layers // pp,) * pp
    return Layout(
        world_size=world, tp=tp, pp=pp, vpp=k["vpp"], cp=cp, ep=ep, etp=etp,
        dp=dp, edp=world // (etp * ep * pp),
        sequence_parallel=k["sequence_parallel"],
        micro_batch_size=k["micro_batch_size"], global_batch_size=global_batch_size,
        num_microbatches=global_batch_size // (k["micro_batch_size"] * dp) if dp else 0,
        recompute=k["recompute"], recompute_method=k["recompute_method"],
        recompute_num_layers=k["recompute_num_layers"],
        num_layer_list=layer_list, noop_layers=noop, stage_layers=stage_layers,
        distributed_optimizer=k["distributed_optimizer"],
        moe_dispatcher=k["moe_dispatcher"], moe_grouped_gemm=k["moe_grouped_gemm"],
        moe_experts=experts_path(model.moe is not None, k["moe_grouped_gemm"], hardware.device),
        moe_permutation_async_comm=k["moe_permutation_async_comm"],
        moe_alltoall_overlap_comm=k["moe_alltoall_overlap_comm"],
        moe_tp_extend_ep=k["moe_tp_extend_ep"],
        swap_attention=k["swap_attention"],
        cp_algo=k["cp_algo"],
    )


def layout_tag(layout: Layout) -> str:
    """`tp2-pp8-ep1[-vpp2][-tpextendep]`: names converted weights after the layout they are split for."""
    tag = f"tp{layout.tp}-pp{layout.pp}-ep{layout.ep}"
    if layout.vpp > 1:
        tag += f"-vpp{layout.vpp}"
    if layout.moe_tp_extend_ep:
        tag += "-tpextendep"
    return tag


DERIVED_WHY = {
    "world_size": "nodes × devices per node",
    "dp": "world size / (tp·pp·cp)",
    "edp": "world size / (etp·ep·pp): the group routed-expert optimizer states are sharded over",
    "num_microbatches": "global batch / (micro batch · dp), per data-parallel rank and step",
    "stage_layers": "layers (with no-op layers) per pipeline stage: the layer list, or an even split",
}
