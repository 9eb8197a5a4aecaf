"""Run by test_device_stubs.py in a launch of one stand-in kind (batch_driver.py, before that launch's runs):
installs the npu or cuda stand-in (device_stubs.py), starts the runtime on it as `dpoc.runtime.train` does, and
tries each piece that issue 20's defects 1-4 concern, each on its own; each rank prints one JSON object
`{check: {"ok", "value" | "error"}}`.

    python -m tests.runtime.device_stub_probe KIND ARGS_FILE      (ARGS_FILE: a tiny MoE run's megatron.args)
"""

import json
import sys
import traceback

import torch

from tests.runtime import device_stubs


def attempt(fn):
    try:
        return {"ok": True, "value": fn()}
    except Exception as exc:  # the probe reports failures instead of raising them
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0],
                "trace": traceback.format_exc(limit=-2)}


def experts(args, device) -> str:
    from dpoc.runtime.model.gpt import build_chunks, transformer_config

    chunk = build_chunks(transformer_config(args, device), args)[0]
    return type(chunk.decoder.layers[0].mlp.experts).__name__


def main(argv: list[str]) -> int:
    kind, args_file = argv
    device_stubs.install(kind)  # first in its process: the stand-in goes in before megatron-core is imported
    import torch.distributed as dist
    from megatron.core import parallel_state

    from dpoc.contract import megatron_args
    from dpoc.runtime.model import device as devices
    from dpoc.runtime.step import session
    from dpoc.runtime.weights import weight_sources

    args = megatron_args.parse([f"@{args_file}"])
    device = devices.select(args.dpoc_device, args.distributed_backend, args_file, args.dpoc_core_attention)
    session.init_distributed(device)
    devices.fill_megatron_gaps()
    try:
        with devices.running_on(device):
            result = {
                "seed": attempt(lambda: session.initialize_parallel(args)),
                "type_name": attempt(lambda: torch.nn.Parameter(torch.zeros(2, device=device.current())).type()),
                "collective": attempt(lambda: weight_sources.problems_everywhere([], args.dpoc_device)),
                "experts": attempt(lambda: experts(args, device)),
            }
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
