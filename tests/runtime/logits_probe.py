"""Run by test_runtime_hf_weights.py (one process, or under torchrun): for each args file, build the model with
the runtime's own code (device, layout, `weight_sources`), forward the saved tokens through megatron-core's
schedule, and write the full-vocabulary logits from the last pipeline stage to `<out>/<args stem>.pt`.
Consecutive args files of one layout share its process groups; a new layout re-initializes them, so one
launch covers several layouts of the same process count.

usage: python -m tests.runtime.logits_probe TOKENS.pt OUT_DIR ARGS_FILE...
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from dpoc import megatron_args
from dpoc.runtime import device as devices
from dpoc.runtime import weight_sources
from dpoc.runtime.model import build_chunks, transformer_config
from dpoc.runtime.train import _init_distributed, initialize_parallel

LAYOUT = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
          "expert_tensor_parallel_size", "num_layers_per_virtual_pipeline_stage")


def forward(chunks, tokens):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)

    def step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch, positions, None)

        def keep(logits):
            full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            return full.sum() * 0, {"logits": full.detach()}

        return out, keep

    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=[iter([tokens]) for _ in chunks] if len(chunks) > 1 else iter([tokens]),
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=1, seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0], forward_only=True)


def main(tokens_file, out_dir, *args_files):
    tokens = torch.load(tokens_file)
    first = megatron_args.parse([f"@{args_files[0]}"])
    device = devices.select(first.dpoc_device, first.distributed_backend)
    _init_distributed(device)
    layout = None
    with devices.running_on(device):
        for args_file in args_files:
            args = megatron_args.parse([f"@{args_file}"])
            if layout != (layout := [getattr(args, k) for k in LAYOUT]):
                parallel_state.destroy_model_parallel()
                initialize_parallel(args)
            policy, _ = weight_sources.sources(args, args_file)
            config = transformer_config(args, device)
            chunks = build_chunks(config, args)
            weight_sources.load(policy, chunks, config, args)
            for chunk in chunks:
                chunk.eval()
            with torch.no_grad():
                stored = forward(chunks, tokens)
            if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and \
                    parallel_state.get_tensor_model_parallel_rank() == 0 and \
                    parallel_state.get_data_parallel_rank() == 0:
                torch.save(stored[0]["logits"], Path(out_dir) / f"{Path(args_file).stem}.pt")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
