"""Run in a fresh process by test_runtime_device.py: each megatron-core CUDA assumption, first without the CPU
bridge (recording the failure), then with it. Prints one JSON object."""

import json
import traceback

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.moe import moe_utils

from dpoc.runtime.model import device as devices


def attempt(fn):
    try:
        return {"ok": True, "value": fn()}
    except Exception as exc:  # the probe reports failures instead of raising them
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0],
                "trace": traceback.format_exc(limit=1)}


def fork_draws(seed):
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    default_before = torch.get_rng_state()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        draw = torch.randn(3).tolist()
    return {"draw": draw, "default_untouched": torch.equal(default_before, torch.get_rng_state())}


def streams():
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    stream.record_event().synchronize()
    return True


def gating():
    out = moe_utils.router_gating_linear(torch.ones(2, 4), torch.ones(3, 4), None, torch.float32)
    return out.tolist()


checks = {
    "rng": lambda: fork_draws(7),
    "factory": lambda: str(torch.empty(2, device="cuda").device),
    "integer_device": lambda: str(torch.zeros(2, device=0).device),
    "current_device": lambda: str(torch.empty(1, device=torch.cuda.current_device()).device),
    "synchronize": lambda: torch.cuda.synchronize() is None,
    "tensor_to_cuda": lambda: str(torch.zeros(2).cuda().device),
    "streams": streams,
    "type_name": lambda: torch.nn.Parameter(torch.zeros(2)).type(),
    "type_conversion": lambda: str(torch.zeros(2).type(torch.float64).dtype),
    "moe_split_sizes": lambda: type(moe_utils.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
                                    ).__name__,
    "router_gemm": gating,
    "tensor_cuda": lambda: str(torch.ones(2).cuda().device),
    # megatron-core's rotary embedding under context parallelism (get_pos_emb_on_this_cp_rank)
    "pinned": lambda: str(torch.tensor([0, 3], device="cpu", pin_memory=True).device),
}
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
parallel_state.initialize_model_parallel()
cpu = devices.Device("cpu", "gloo")
result = {"before": {name: attempt(check) for name, check in checks.items()}}
devices.select("cpu", "gloo")
devices.fill_megatron_gaps()
with devices.running_on(cpu):
    result["after"] = {name: attempt(check) for name, check in checks.items()}
    result["after"]["rng_repeat"] = attempt(lambda: fork_draws(7))
parallel_state.destroy_model_parallel()
dist.destroy_process_group()
print(json.dumps(result))
