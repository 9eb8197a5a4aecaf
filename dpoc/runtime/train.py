"""DPO training with megatron-core: `torchrun ... -m dpoc.runtime.train @build/<name>/megatron.args`.

The args file is the only input besides the torchrun environment. Each step: a forward-only pass of the
frozen reference (or, with `--dpoc-reference precomputed`, its log-probs looked up by pair index in the file
`precompute.py` wrote; then no reference model is built), a forward/backward pass of the policy (both
through megatron-core's pipeline schedules), one distributed-optimizer step with gradient clipping, one
LR-schedule step, one metrics line;
a checkpoint when one is due (`checkpoint.py`), and a saved, orderly stop on SIGTERM (`preemption.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    finalize_model_grads,
)

from dpoc.contract.errors import EXIT_PREEMPTED
from dpoc.contract.kernels import FUSED
from dpoc.runtime.checkpoint.preemption import Preemption
from dpoc.runtime.checkpoint.save_load import Checkpointer, check_start
from dpoc.runtime.model import device as devices
from dpoc.runtime.model import lora
from dpoc.runtime.model.gpt import (
    expert_path,
    transformer_config,
    uniform_micro_batch_length,
)
from dpoc.runtime.reference.table import shared_table
from dpoc.runtime.step import memory_probe
from dpoc.runtime.step.data import Batching, rank_micro_batches, training_dataset
from dpoc.runtime.step.dpo import Objective
from dpoc.runtime.step.passes import holds_outputs, policy_pass, reference_pass
from dpoc.runtime.step.run_log import RunLog
from dpoc.runtime.step.session import build_models, build_optimizer, entry, initialize_parallel, sync_params
from dpoc.runtime.weights import weight_sources


def main(argv: Sequence[str] | None = None) -> int:
    return entry(argv, train)


def train(args: argparse.Namespace, device: devices.Device, args_file: str,
          weights: tuple[weight_sources.WeightSource, ...]) -> int:
    """The training loop; returns the process's exit code (0, or EXIT_PREEMPTED after a SIGTERM's save)."""
    preemption = Preemption(enabled=args.save is not None and not args.dpoc_measure_memory)
    check_start(args, args_file)
    initialize_parallel(args)
    dataset = training_dataset(args, args_file)
    # before any model is built: a missing or stale file stops the run at once
    precomputed = shared_table(args, args_file, len(dataset)) \
        if args.dpoc_reference == "precomputed" else None
    config = transformer_config(args, device)
    policy, reference = build_models(args, config, weights)
    optimizer, scheduler = build_optimizer(args, policy)
    config.no_sync_func = [c.no_sync for c in policy] if len(policy) > 1 else policy[0].no_sync
    config.finalize_model_grads_func = lora.finalize_with_adapters(finalize_model_grads) \
        if lora.settings(args) else finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss

    objective = Objective.from_args(args)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    batching = Batching.from_args(args, same_length=uniform_micro_batch_length(args))
    checkpoints = Checkpointer(args, args_file, device, policy, optimizer, scheduler, len(dataset))
    # the memory probe measures step 1 of a fresh model and stops: it reads and writes no checkpoint
    start, notes = (0, ["memory probe: step 1 only, no checkpoint is read or written"]) \
        if args.dpoc_measure_memory else checkpoints.resume()
    log = _open_log(args, device, dp_size, start, weights, precomputed, reference is policy) \
        if dist.get_rank() == 0 else None
    say = log.line if log else None
    for note in [*(f"warning: {w}" for w in dataset.warnings), *notes] if log else ():
        log.line(note)
    for step in range(start, args.train_iters):
        started = time.perf_counter()
        batches = rank_micro_batches(dataset, step, batching, dp_rank, dp_size, device.current())
        if precomputed is not None:
            batches = [precomputed.fill(b) for b in batches]
        elif reference:  # none for a reference-free loss
            reference_pass(reference, batches, objective.sequence_logps)
        for chunk in policy:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        saved = memory_probe.SavedTensors(policy) if args.dpoc_measure_memory else None
        with saved.recording() if saved else contextlib.nullcontext():
            per_micro_batch = policy_pass(policy, batches, objective)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        _, grad_norm, _ = optimizer.step()
        if saved:  # after the first update, when the optimizer's state exists
            frozen = [] if reference is policy else reference  # a LoRA policy that is its own reference
            sync_params(policy)
            memory_probe.write(args.dpoc_run_dir, memory_probe.static_bytes(policy, frozen, optimizer), saved)
            break
        scheduler.step(increment=1)
        record = _step_metrics(per_micro_batch, batches, objective, args.global_batch_size, dp_size, device)
        device.synchronize()
        elapsed = time.perf_counter() - started
        tokens = record.pop("tokens")
        if log:
            log.step({"step": step + 1, **record, "grad_norm": float(grad_norm or 0.0),
                      "lr": lr,
                      "samples_per_s": args.global_batch_size / elapsed,
                      "tokens_per_s": tokens / elapsed})
        stop = preemption.agreed(device)
        if stop or checkpoints.due(step + 1):
            reason = "preempted" if stop else "end" if step + 1 == args.train_iters else "interval"
            checkpoints.save(step + 1, reason, say)
        if stop:
            if log:
                log.line(f"preempted (SIGTERM): stopped after step {step + 1} with its checkpoint saved; run "
                         f"again to resume (exit {EXIT_PREEMPTED})")
                log.close()
            return EXIT_PREEMPTED
    if log:
        if start >= args.train_iters:
            log.line(f"nothing to train: the checkpoint is at step {start} of {args.train_iters}")
        log.close()
    return 0


def _open_log(args: argparse.Namespace, device: devices.Device, dp_size: int, start: int,
              weights: tuple[weight_sources.WeightSource, ...], precomputed, shared_base: bool) -> RunLog:
    log = RunLog(args.dpoc_run_dir, args.train_iters, start, args.tensorboard_dir)
    log.line(f"dpoc runtime: {dist.get_world_size()} processes on {device.kind}, "
             f"tp={args.tensor_model_parallel_size} pp={args.pipeline_model_parallel_size} "
             f"cp={args.context_parallel_size} ep={args.expert_model_parallel_size} dp={dp_size}, "
             f"plan {args.dpoc_plan_hash or '-'}")
    log.line(f"kernels: attention {devices.attention_kernel(device.kind, args.dpoc_core_attention)}, "
             f"moe experts {expert_path(args)}, fused {' '.join(FUSED[device.kind]) or '-'}")
    reference = "none (a reference-free loss)" if args.dpoc_reference == "none" else weights[1].describe()
    adapters = lora.settings(args)
    if adapters:
        log.line(f"lora: rank {adapters.rank}, alpha {adapters.alpha:g}, dropout {adapters.dropout:g} on "
                 f"{', '.join(adapters.targets)}{' (experts too)' if adapters.experts else ''}; the base is frozen")
        if shared_base:
            reference = (f"the policy with its initial adapter ({args.lora_load}) frozen in place of the trained one"
                         if args.lora_load else "the policy with its adapters off (the frozen base)")
    log.line(f"weights: policy from {weights[0].describe()}, reference from {reference}"
             + (f" (precomputed log-probs: {precomputed.path})" if precomputed is not None else ""))
    return log


def _step_metrics(per_micro_batch: list[dict], batches: list, objective: Objective, global_batch: int, dp_size: int,
                  device: devices.Device) -> dict[str, float]:
    """The step's metrics (`Objective.record`): the last pipeline stage's first tensor-parallel rank of each
    data-parallel replica contributes its micro-batches' sums, row j its j-th, and its token counts; one
    all-reduce over the world adds them up, in float32 (torch_npu has no float64 on the device). `fill`: real
    tokens / tokens of the rows they were given."""
    keys = objective.metric_keys
    values = torch.zeros(len(batches) * len(keys) + 2, dtype=torch.float32, device=device.current())
    if holds_outputs():
        for j, metrics in enumerate(per_micro_batch):
            values[j * len(keys): (j + 1) * len(keys)] = torch.stack([metrics[k].float() for k in keys])
        values[-2] = sum(b.real_tokens for b in batches)
        values[-1] = sum(b.row_tokens for b in batches)
    dist.all_reduce(values)
    record = objective.record(values[:-2].view(len(batches), len(keys)).cpu(), global_batch, dp_size)
    record["fill"] = float(values[-2] / values[-1])
    record["tokens"] = float(values[-2])
    return record


if __name__ == "__main__":  # dist checkpointing spawns helper processes that re-import this module
    sys.exit(main())
