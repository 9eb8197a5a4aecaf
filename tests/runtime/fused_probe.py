"""Run in a fresh process by test_fused_kernels.py: on the npu stand-in (device_stubs.py), one forward and
backward of a tiny model from seeded weights, with the device's fused kernels (dpoc/runtime/model/fused.py)
and again with them off (`kernels.FUSED["npu"]` empty, megatron's own rotary); prints one JSON object with
each run's per-token losses, every parameter's gradient and how often each fused kernel ran.

    python tests/runtime/fused_probe.py ARGS_FILE
"""

import collections
import json
import sys

from tests.runtime import device_stubs

device_stubs.install("npu")

import torch  # noqa: E402
import torch_npu  # noqa: E402  (the stand-in)
from megatron.core.models.common.embeddings import rope_utils  # noqa: E402
from megatron.core.transformer import attention  # noqa: E402

from dpoc.contract import kernels, megatron_args  # noqa: E402
from dpoc.runtime.model import device as devices  # noqa: E402
from dpoc.runtime.model import fused, seeded_init  # noqa: E402
from dpoc.runtime.model.gpt import build_chunks, transformer_config  # noqa: E402
from dpoc.runtime.step import session  # noqa: E402

CALLS: collections.Counter = collections.Counter()


def counted(name: str) -> None:
    kernel = getattr(torch_npu, name)

    def call(*args, **kwargs):
        CALLS[name] += 1
        return kernel(*args, **kwargs)

    setattr(torch_npu, name, call)


def run(args, device) -> dict:
    CALLS.clear()
    config = transformer_config(args, device)
    chunk = build_chunks(config, args)[0]
    seeded_init.initialize([chunk], config, args.seed)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.padded_vocab_size, (2, 32), generator=generator).to(device.current())
    positions = torch.arange(32).repeat(2, 1).to(device.current())
    losses = chunk(ids, positions, None, labels=ids)
    losses.sum().backward()
    return {"losses": losses.flatten().tolist(), "calls": dict(CALLS),
            "grads": {name: p.grad.flatten().tolist() for name, p in chunk.named_parameters()}}


args = megatron_args.parse([f"@{sys.argv[1]}"])
for name in fused.KERNELS.values():
    counted(name)
device = devices.select(args.dpoc_device, args.distributed_backend, sys.argv[1], args.dpoc_core_attention)
session.init_distributed(device)
with devices.running_on(device):
    session.initialize_parallel(args)
    result = {"fused": run(args, device)}
    kernels.FUSED["npu"] = ()
    attention.apply_rotary_pos_emb = rope_utils.apply_rotary_pos_emb
    result["unfused"] = run(args, device)
print(json.dumps(result))
