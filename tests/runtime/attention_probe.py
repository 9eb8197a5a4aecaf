"""Run in a fresh process by test_runtime_attention.py: one step's policy pass of the runtime's model under
two core-attention kernels from the same seeded weights and batches; prints, as one JSON line, the
micro-batch losses and every parameter's gradient under each, so the test compares them.

    python tests/runtime/attention_probe.py ARGS_FILE KERNEL_A KERNEL_B
"""

import json
import sys

import torch

from dpoc.contract import megatron_args
from dpoc.runtime.model import seeded_init
from dpoc.runtime.model.gpt import build_chunks, transformer_config
from dpoc.runtime.step.data import Batching, PairwiseDataset, rank_micro_batches
from dpoc.runtime.step.dpo import Objective
from dpoc.runtime.step.passes import policy_pass
from tests.runtime.synthetic import one_process


def policy_gradients(args, device, kernel: str) -> dict:
    args.dpoc_core_attention = kernel
    config = transformer_config(args, device)
    chunks = build_chunks(config, args)
    seeded_init.initialize(chunks, config, args.seed)
    dataset = PairwiseDataset(args.data_path, args.seq_length)
    batches = rank_micro_batches(dataset, 0, Batching.from_args(args, same_length=False), 0, 1, device.current())
    for batch in batches:  # any fixed reference works: the policy's gradient is what is compared
        batch.reference_logps = torch.linspace(-30.0, -10.0, batch.tokens.shape[0])
    metrics = policy_pass(chunks, batches, Objective.from_args(args))
    return {"loss": [float(m["loss"]) for m in metrics],
            "grads": {name: p.grad.flatten().tolist() for chunk in chunks
                      for name, p in chunk.named_parameters()}}


def main() -> None:
    args = megatron_args.parse([f"@{sys.argv[1]}"])
    with one_process(args.seed) as device:
        result = {kernel: policy_gradients(args, device, kernel) for kernel in sys.argv[2:]}
    print(json.dumps(result))


main()
