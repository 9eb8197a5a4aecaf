"""Run in a fresh process by test_device_stubs.py: installs the npu or cuda stand-in (device_stubs.py), starts
the runtime on it as `dpoc.runtime.train` does, and tries each piece that issue 20's defects 1-4 concern, each
on its own; prints one JSON object `{check: {"ok", "value" | "error"}}`.

    python tests/runtime/device_stub_probe.py KIND ARGS_FILE      (ARGS_FILE: a tiny MoE run's megatron.args)
"""

import json
import sys
import traceback

from tests.runtime import device_stubs

device_stubs.install(sys.argv[1])

import torch  # noqa: E402

from dpoc.contract import megatron_args  # noqa: E402
from dpoc.runtime.model import device as devices  # noqa: E402
from dpoc.runtime.model.gpt import build_chunks, transformer_config  # noqa: E402
from dpoc.runtime.step import session  # noqa: E402
from dpoc.runtime.weights import weight_sources  # noqa: E402


def attempt(fn):
    try:
        return {"ok": True, "value": fn()}
    except Exception as exc:  # the probe reports failures instead of raising them
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0],
                "trace": traceback.format_exc(limit=-2)}


def experts(args, device) -> str:
    chunk = build_chunks(transformer_config(args, device), args)[0]
    return type(chunk.decoder.layers[0].mlp.experts).__name__


args = megatron_args.parse([f"@{sys.argv[2]}"])
device = devices.select(args.dpoc_device, args.distributed_backend, sys.argv[2], args.dpoc_core_attention)
session.init_distributed(device)
devices.fill_megatron_gaps()
with devices.running_on(device):
    result = {
        "seed": attempt(lambda: session.initialize_parallel(args)),
        "type_name": attempt(lambda: torch.nn.Parameter(torch.zeros(2, device=device.current())).type()),
        "collective": attempt(lambda: weight_sources.problems_everywhere([], args.dpoc_device)),
        "experts": attempt(lambda: experts(args, device)),
    }
print(json.dumps(result))
