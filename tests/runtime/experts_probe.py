"""Run by test_device_experts.py (batch_driver.py), alone or under torchrun on the CPU: one step's policy pass of the tiny MoE
model from the same seeded weights and batches under each experts kernel named; writes, as OUT_DIR/rank<N>.json,
the micro-batch losses and every parameter's gradient under each. `npu-gmm` calls the documented
npu_grouped_matmul (npu_kernels.py), installed as `torch_npu`. Args with `--lora-r`: the base frozen and the
adapters attached as training attaches them, B set non-zero (lora_probe.seeded_b) so that every factor has a
gradient; then the gradients are the adapters' alone.

    python -m tests.runtime.experts_probe ARGS_FILE OUT_DIR KERNEL...
"""

import json
import sys
import types
from pathlib import Path

import torch
import torch.distributed as dist

from dpoc.contract import megatron_args
from dpoc.runtime.model import device as devices
from dpoc.runtime.model import lora, seeded_init
from dpoc.runtime.model.gpt import build_chunks, transformer_config
from dpoc.runtime.step import session
from dpoc.runtime.step.data import Batching, PairwiseDataset, rank_micro_batches
from dpoc.runtime.step.dpo import Objective
from dpoc.runtime.step.passes import policy_pass
from dpoc.runtime.weights import sharded
from tests.runtime import npu_kernels
from tests.runtime.lora_probe import seeded_b


def gradients(args, device, kernel: str) -> dict:
    from megatron.core import parallel_state

    config = transformer_config(args, device)
    chunks = build_chunks(config, args, experts=kernel)
    seeded_init.initialize(chunks, config, args.seed)
    adapters = lora.settings(args)
    if adapters:
        lora.attach(chunks, adapters, args.seed, gated=args.swiglu)
        sharded.fill(chunks, seeded_b)
    dataset = PairwiseDataset(args.data_path, args.seq_length)
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    batches = rank_micro_batches(dataset, 0, Batching.from_args(args, same_length=False), dp_rank, dp,
                                 device.current())
    for batch in batches:  # any fixed reference works: the policy's gradient is what is compared
        batch.reference_logps = torch.linspace(-30.0, -10.0, batch.tokens.shape[0])
    metrics = policy_pass(chunks, batches, Objective.from_args(args))
    experts = type(chunks[0].decoder.layers[0].mlp.experts).__name__
    return {"experts": experts, "loss": [float(m["loss"]) for m in metrics],
            "grads": {name: p.grad.flatten().tolist() for chunk in chunks for name, p in chunk.named_parameters()
                      if p.requires_grad}}


def main(argv: list[str]) -> int:
    args_file, out_dir, *kernels = argv
    sys.modules["torch_npu"] = types.SimpleNamespace(npu_grouped_matmul=npu_kernels.npu_grouped_matmul)
    from megatron.core import parallel_state

    args = megatron_args.parse([f"@{args_file}"])
    device = devices.select("cpu", "gloo")
    session.init_distributed(device)
    try:
        with devices.running_on(device):
            session.initialize_parallel(args)
            result = {kernel: gradients(args, device, kernel) for kernel in kernels}
        (Path(out_dir) / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
