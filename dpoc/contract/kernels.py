"""The optional kernels each device kind runs, fastest first: the runtime's device module picks from these
tables (`dpoc/runtime/model/device.py`), and the compiler records in the Plan which MoE experts path a build
runs (`layout.moe_experts`), so both read one list. docs/devices.md says why each is what it is."""

from __future__ import annotations

# core attention (dpoc/runtime/model/attention.py); `auto` takes the first available, TE only when installed
ATTENTION = {"cpu": ("sdpa", "local"), "cuda": ("te", "sdpa", "local"), "npu": ("npu-fusion", "local")}
# MoE experts (dpoc/runtime/model/experts.py): grouped GEMM kernels, then megatron-core's SequentialMLP loop;
# torch's grouped GEMM only counts when the node's torch has it
EXPERTS = {"cpu": ("sequential",), "cuda": ("torch-grouped-mm", "sequential"), "npu": ("npu-gmm", "sequential")}
# the fused elementwise kernels (dpoc/runtime/model/fused.py): torch_npu's on npu; cuda keeps megatron-core's
# own jit fusions, the cpu runs torch's unfused code
FUSED: dict[str, tuple[str, ...]] = {"cpu": (), "cuda": (), "npu": ("rms-norm", "rotary", "swiglu")}

EXPERTS_WHY = {
    "npu-gmm": "torch_npu's npu_grouped_matmul, two grouped GEMMs per layer over SequentialMLP's weights",
    "torch-grouped-mm": "torch._grouped_mm, two grouped GEMMs per layer over SequentialMLP's weights (a torch "
                        "without it loops over the experts instead, with one warning)",
    "sequential": "megatron-core's SequentialMLP, one expert MLP after another",
}


def experts_why(grouped_gemm: bool, device: str, path: str | None) -> str:
    """Why a build runs the experts path it does (the Plan's provenance for `layout.moe_experts`)."""
    if path is None:
        return "a dense model has no experts"
    return f"moe_grouped_gemm {'on' if grouped_gemm else 'off'}, device {device}: {EXPERTS_WHY[path]}"


def experts_path(moe: bool, grouped_gemm: bool, device: str) -> str | None:
    """The experts kernel a run uses: the device's grouped GEMM when asked for, else the loop; None when dense."""
    if not moe:
        return None
    return EXPERTS[device][0] if grouped_gemm else "sequential"
