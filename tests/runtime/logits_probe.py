"""Run by test_runtime_hf_weights.py (one process, or under torchrun): for each args file, build the model with
the runtime's own code (device, layout, `weight_sources`), forward the saved tokens through megatron-core's
schedule, and write the full-vocabulary logits from the last pipeline stage to `<out>/<args stem>.pt`.
Consecutive args files of one layout share its process groups; a new layout re-initializes them, so one
launch covers several layouts of the same process count.

Args with --moe-grouped-gemm: the weights are loaded into megatron-core's grouped-GEMM experts (GroupedMLP,
which cannot run forward on the CPU), compared with the HF tensors directly (`<stem>.json`: largest
difference), saved as a distributed checkpoint and loaded into the sequential experts, whose logits are written.

usage: python -m tests.runtime.logits_probe TOKENS.pt OUT_DIR ARGS_FILE...
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe import grouped_gemm_util as gg
from megatron.core.transformer.moe.experts import GroupedMLP
from safetensors import safe_open

from dpoc.contract import megatron_args
from dpoc.runtime.model import device as devices
from dpoc.runtime.model.gpt import build_chunks, transformer_config
from dpoc.runtime.step.session import init_distributed, initialize_parallel
from dpoc.runtime.weights import weight_sources

LAYOUT = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
          "expert_tensor_parallel_size", "num_layers_per_virtual_pipeline_stage")


def forward(chunks, tokens):
    """Logits [b, s, vocab] of `tokens` [b, s], one sequence per micro-batch (the interleaved schedule wants
    at least as many micro-batches as pipeline stages)."""
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)

    def step(data_iterator, model):
        out = model(next(data_iterator), positions, None)

        def keep(logits):
            full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            return full.sum() * 0, {"logits": full.detach()}

        return out, keep

    rows = list(tokens.split(1))
    stored = get_forward_backward_func()(
        forward_step_func=step, data_iterator=[iter(rows) for _ in chunks] if len(chunks) > 1 else iter(rows),
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(rows), seq_length=tokens.shape[1],
        micro_batch_size=1, forward_only=True)
    return torch.cat([s["logits"] for s in stored]) if stored else None


def through_grouped_experts(policy, config, args, stem: Path):
    gg.assert_grouped_gemm_is_available = lambda: None  # building GroupedMLP needs no kernel; its forward would
    grouped_config = dataclasses.replace(config, moe_grouped_gemm=True)
    grouped = build_chunks(grouped_config, args)
    weight_sources.load(policy, grouped, grouped_config, args)
    diffs = {"weight1": 0.0, "weight2": 0.0, "experts": 0}
    with safe_open(str(Path(policy.path) / "model.safetensors"), "pt") as hf:
        for layer in grouped[0].decoder.layers:
            experts, number = layer.mlp.experts, layer.layer_number - 1
            assert isinstance(experts, GroupedMLP)
            first = parallel_state.get_expert_model_parallel_rank() * experts.num_local_experts
            # GroupedMLP computes x @ w1[e] with w1 = weight1.view(E_local, h, 2 ffn): fc1 transposed
            w1 = experts.weight1.view(experts.num_local_experts, config.hidden_size, -1)
            w2 = experts.weight2.view(experts.num_local_experts, -1, config.hidden_size)
            for e in range(experts.num_local_experts):
                name = f"model.layers.{number}.mlp.experts.{first + e}."
                fc1 = torch.cat([hf.get_tensor(name + "gate_proj.weight"), hf.get_tensor(name + "up_proj.weight")])
                diffs["weight1"] = max(diffs["weight1"], float((w1[e].t() - fc1).abs().max()))
                diffs["weight2"] = max(diffs["weight2"], float((w2[e].t() - hf.get_tensor(name + "down_proj.weight")
                                                                 ).abs().max()))
                diffs["experts"] += 1
    stem.with_suffix(".json").write_text(json.dumps(diffs))
    checkpoint = stem.with_name(stem.name + "-checkpoint")
    checkpoint.mkdir(exist_ok=True)
    dist_checkpointing.save({"model0": grouped[0].sharded_state_dict()}, str(checkpoint))
    sequential = build_chunks(config, args)
    weight_sources.load(weight_sources.WeightSource("checkpoint", str(checkpoint), "--load"), sequential, config,
                        args)
    return sequential


def main(tokens_file, out_dir, *args_files):
    tokens = torch.load(tokens_file)
    first = megatron_args.parse([f"@{args_files[0]}"])
    device = devices.select(first.dpoc_device, first.distributed_backend)
    init_distributed(device)
    layout = None
    with devices.running_on(device):
        for args_file in args_files:
            args = megatron_args.parse([f"@{args_file}"])
            if layout != (layout := [getattr(args, k) for k in LAYOUT]):
                parallel_state.destroy_model_parallel()
                initialize_parallel(args)
            policy, _ = weight_sources.sources(args, args_file)
            config = transformer_config(args, device)
            if args.moe_grouped_gemm:
                chunks = through_grouped_experts(policy, config, args, Path(out_dir) / Path(args_file).stem)
            else:
                chunks = build_chunks(config, args)
                weight_sources.load(policy, chunks, config, args)
            for chunk in chunks:
                chunk.eval()
            with torch.no_grad():
                stored = forward(chunks, tokens)
            if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and \
                    parallel_state.get_tensor_model_parallel_rank() == 0 and \
                    parallel_state.get_data_parallel_rank() == 0:
                torch.save(stored, Path(out_dir) / f"{Path(args_file).stem}.pt")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
