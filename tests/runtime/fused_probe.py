"""Run by test_fused_kernels.py through the module's Runs (one launch holds every model): on the npu stand-in
(device_stubs.py), one forward and backward of a tiny model from seeded weights, with the device's fused
kernels (dpoc/runtime/model/fused.py) and again with them off (`kernels.FUSED["npu"]` empty, megatron's own
rotary); prints one JSON object with each run's per-token losses, every parameter's gradient and how often each
fused kernel ran. What it changes (the counted kernels, FUSED, the rotary) is put back for the next case.

    python -m tests.runtime.fused_probe ARGS_FILE
"""

import collections
import json
import sys

from tests.runtime import device_stubs

CALLS: collections.Counter = collections.Counter()


def counted(owner, name: str):
    """Count the calls of `owner.<name>`; the function that puts the original back."""
    kernel = getattr(owner, name)

    def call(*args, **kwargs):
        CALLS[name] += 1
        return kernel(*args, **kwargs)

    setattr(owner, name, call)
    return lambda: setattr(owner, name, kernel)


def run(args, device) -> dict:
    import torch

    from dpoc.runtime.model import seeded_init
    from dpoc.runtime.model.gpt import build_chunks, transformer_config

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


def main(argv: list[str]) -> int:
    """Both runs of the args file's model; the JSON object on stdout."""
    if device_stubs.installed != ["npu"]:
        device_stubs.install("npu")
    import torch.distributed as dist
    import torch_npu  # the stand-in
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer import attention

    from dpoc.contract import kernels, megatron_args
    from dpoc.runtime.model import device as devices
    from dpoc.runtime.model import fused
    from dpoc.runtime.step import session

    (args_file,) = argv
    args = megatron_args.parse([f"@{args_file}"])
    restores = [counted(torch_npu, name) for name in fused.KERNELS.values()]
    device = devices.select(args.dpoc_device, args.distributed_backend, args_file, args.dpoc_core_attention)
    fused_kinds, rotary = kernels.FUSED["npu"], attention.apply_rotary_pos_emb  # the rotary select installed
    try:
        session.init_distributed(device)
        with devices.running_on(device):
            session.initialize_parallel(args)
            result = {"fused": run(args, device)}
            kernels.FUSED["npu"] = ()
            attention.apply_rotary_pos_emb = rope_utils.apply_rotary_pos_emb
            result["unfused"] = run(args, device)
    finally:
        kernels.FUSED["npu"], attention.apply_rotary_pos_emb = fused_kinds, rotary
        for restore in restores:
            restore()
        if dist.is_initialized():
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":  # dist checkpointing spawns helper processes that re-import this module
    sys.exit(main(sys.argv[1:]))
