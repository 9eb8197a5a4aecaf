"""Run by test_runtime_lora.py, alone or under torchrun on the CPU: one policy pass of a LoRA model built as
training builds it (seeded base, adapters, DDP, the adapters' gradient finalisation), with B set to seeded
layout-independent values so that A's gradients are not zero, then one optimizer step. Rank 0 writes
OUT_DIR/lora.json: the step's summed micro-batch loss, every adapter factor's global gradient (assembled from
the ranks' shards by checkpoint key), and what the base and the optimizer hold.

    python -m tests.runtime.lora_probe ARGS_FILE OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads

from dpoc.contract import megatron_args
from dpoc.runtime.model import device as devices
from dpoc.runtime.model import lora, seeded_init
from dpoc.runtime.model.gpt import transformer_config, uniform_micro_batch_length
from dpoc.runtime.step import session
from dpoc.runtime.step.data import Batching, PairwiseDataset, rank_micro_batches
from dpoc.runtime.step.dpo import Objective
from dpoc.runtime.step.passes import holds_outputs, policy_pass
from dpoc.runtime.weights import sharded, weight_sources


def seeded_b(sh) -> torch.Tensor:
    if "lora_B" not in sh.key:
        return sh.data.clone()

    def block(index, rows, rest):
        full = torch.randn(sh.global_shape[len(index):], generator=seeded_init.generator(0, sh.key, index)) * 0.1
        return full[(slice(rows.start, rows.stop), *rest)]

    return sharded.assemble(sh, block)


def global_adapters(modules) -> dict[str, list[float]]:
    """Each adapter tensor (as the params now hold it) in its global shape, summed from the main replicas."""
    mine = {}
    for module in modules:
        for sh in sharded.sharded_tensors(module.sharded_state_dict()):
            if not lora.is_adapter(sh.key):
                continue
            full = mine.setdefault(sh.key, torch.zeros(sh.global_shape))
            replica = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
            if all(r == 0 for r in replica):
                local = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
                place = tuple(slice(o, o + n) for o, n in zip(sh.global_offset, local, strict=True))
                full[place] += sh.data.detach().float().reshape(local)
    shapes = [None] * dist.get_world_size()
    dist.all_gather_object(shapes, {k: tuple(v.shape) for k, v in mine.items()})
    union = {k: v for part in shapes for k, v in part.items()}
    result = {}
    for key in sorted(union):
        tensor = mine.get(key, torch.zeros(union[key]))
        dist.all_reduce(tensor)
        result[key] = tensor.flatten().tolist()
    return result


def main(argv: list[str]) -> int:
    args_file, out_dir = argv
    args = megatron_args.parse([f"@{args_file}"])
    device = devices.select("cpu", "gloo")
    session.init_distributed(device)
    try:
        with devices.running_on(device):
            probe(args, args_file, device, Path(out_dir))
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    return 0


def probe(args, args_file: str, device: devices.Device, out_dir: Path) -> None:
    """The policy pass, the gradients gathered and the optimizer step; rank 0 writes out_dir/lora.json."""
    session.initialize_parallel(args)
    config = transformer_config(args, device)
    weights = weight_sources.sources(args, args_file)
    policy, reference = session.build_models(args, config, weights)
    optimizer, _ = session.build_optimizer(args, policy)
    config.finalize_model_grads_func = lora.finalize_with_adapters(finalize_model_grads)
    modules = [c.module for c in policy]
    sharded.fill(modules, seeded_b)
    base_before = {(i, n): p.detach().clone() for i, m in enumerate(modules) for n, p in m.named_parameters()
                   if not p.requires_grad}
    dataset = PairwiseDataset(args.data_path, args.seq_length)
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    batches = rank_micro_batches(dataset, 0, Batching.from_args(args, same_length=uniform_micro_batch_length(args)), dp_rank, dp,
                                 device.current())
    for batch in batches:  # any fixed reference works: the policy's gradient is what is compared
        batch.reference_logps = torch.linspace(-30.0, -10.0, batch.tokens.shape[0])
    for chunk in policy:
        chunk.zero_grad_buffer()
    metrics = policy_pass(policy, batches, Objective.from_args(args))
    loss = torch.tensor([sum(float(m["loss"]) for m in metrics) if holds_outputs() else 0.0])
    dist.all_reduce(loss)
    params = [p for m in modules for p in m.parameters()]
    adapters = [p for p in params if p.requires_grad]
    values = [p.detach().clone() for p in adapters]
    for p in adapters:
        p.data.copy_(p.main_grad)
    grads = global_adapters(modules)
    for p, v in zip(adapters, values, strict=True):
        p.data.copy_(v)
    optimizer.step()
    states = [t for o in getattr(optimizer, "chained_optimizers", [optimizer]) for s in o.optimizer.state.values()
              for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    result = {
        "loss": float(loss), "grads": grads, "shared_reference": reference is policy,
        "adapter_names": sorted(n for m in modules for n, p in m.named_parameters() if p.requires_grad),
        "base_with_main_grad": [n for m in modules for n, p in m.named_parameters()
                                if not p.requires_grad and hasattr(p, "main_grad")],
        "base_changed": [n for i, m in enumerate(modules) for n, p in m.named_parameters()
                         if not p.requires_grad and not torch.equal(p, base_before[i, n])],
        "adapter_numel": sum(p.numel() for p in adapters),
        "optimizer_state_numel": sum(t.numel() for t in states),
        "buffer_numel": sum(p.numel() for c in policy for b in [*c.buffers, *c.expert_parallel_buffers]
                            for p in b.params),
    }
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, {k: v for k, v in result.items() if k != "grads"})
    if dist.get_rank() == 0:
        result["ranks"] = everything
        (out_dir / "lora.json").write_text(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
