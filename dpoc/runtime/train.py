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
import copy
import datetime
import os
import socket
import sys
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from dpoc.contract import megatron_args
from dpoc.contract.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, DpocError, Problem
from dpoc.runtime import precompute
from dpoc.runtime.checkpoint.preemption import Preemption
from dpoc.runtime.checkpoint.save_load import Checkpointer, check_start
from dpoc.runtime.model import device as devices
from dpoc.runtime.model.gpt import (
    build_chunks,
    check_supported,
    params_dtype,
    transformer_config,
    uniform_micro_batch_length,
    virtual_pipeline_size,
)
from dpoc.runtime.step import memory_probe
from dpoc.runtime.step.data import Batching, PairwiseDataset, rank_micro_batches
from dpoc.runtime.step.dpo import METRIC_KEYS, Objective
from dpoc.runtime.step.passes import policy_pass, reference_pass
from dpoc.runtime.step.run_log import RunLog
from dpoc.runtime.weights import weight_sources


def main(argv: Sequence[str] | None = None) -> int:
    return entry(argv, train)


def entry(argv: Sequence[str] | None, body, check=None) -> int:
    """Parse megatron.args, check what needs no process group (and `check`, the caller's own), join it, run
    `body`; problems exit 2 (training and the precompute pass alike)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args_file = next((a[1:] for a in argv if a.startswith("@")), "megatron.args")
    args = megatron_args.parse(argv)
    try:
        device = devices.select(args.dpoc_device, args.distributed_backend, args_file, args.dpoc_core_attention)
        check_supported(args, args_file)
        if check is not None:
            check(args, args_file)
        check_layout(args, _world_size(), args_file)
        weights = weight_sources.sources(args, args_file)  # before any process waits for another
        _init_distributed(device)
        with devices.running_on(device):
            return body(args, device, args_file, weights)
    except DpocError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        if dist.is_initialized():
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_layout(args: argparse.Namespace, world: int, args_file: str) -> None:
    """The layout must tile the processes torchrun started, and the batch the data-parallel ranks."""
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size \
        * args.context_parallel_size
    if world % model_parallel:
        raise DpocError([Problem(args_file, "--tensor-model-parallel-size",
                                 f"tp*pp*cp = {model_parallel} does not divide the {world} processes started "
                                 f"(valid: launch a multiple of {model_parallel} processes)")])
    dp = world // model_parallel
    per_step = args.micro_batch_size * dp
    if args.global_batch_size % per_step:
        raise DpocError([Problem(args_file, "--global-batch-size",
                                 f"{args.global_batch_size} pairs are not a multiple of micro-batch "
                                 f"{args.micro_batch_size} x data-parallel {dp} = {per_step}")])


def _init_distributed(device: devices.Device) -> None:
    """Join torchrun's process group; a bare `python -m` run becomes a one-process group on loopback."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.kind != "cpu":
        getattr(torch, device.kind).set_device(local_rank)
    dist.init_process_group(backend=device.backend, timeout=datetime.timedelta(minutes=30))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_parallel(args: argparse.Namespace) -> None:
    """megatron-core's process groups for the args' layout, and its seeded RNG tracker."""
    devices.fill_megatron_gaps()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size(args),
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)


def build_models(args: argparse.Namespace, config, weights: tuple[weight_sources.WeightSource, ...]
                 ) -> tuple[list, list]:
    """Policy (DDP-wrapped chunks) and frozen reference with the same sharding, each filled from its source
    (`weight_sources.sources`) before wrapping."""
    policy_source, reference_source = weights
    policy_config, reference_config = config, copy.copy(config)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=args.use_distributed_optimizer)
    chunks = build_chunks(policy_config, args)
    if policy_source.kind != "resume":  # a resumed policy is read from its checkpoint once the optimizer exists
        weight_sources.load(policy_source, chunks, config, args)
    policy = [DistributedDataParallel(policy_config, ddp_config, _in_precision(policy_config, chunk),
                                      disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]
    if args.dpoc_reference == "precomputed":
        return policy, []
    return policy, build_reference(args, reference_config, reference_source)


def build_reference(args: argparse.Namespace, config, source: weight_sources.WeightSource) -> list:
    """The frozen reference's chunks, filled from `source`, in eval mode and without gradients."""
    chunks = build_chunks(config, args)
    weight_sources.load(source, chunks, config, args)
    reference = []
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
        reference.append(_in_precision(config, chunk))
    return reference


def _in_precision(config, chunk: torch.nn.Module) -> torch.nn.Module:
    """bf16/fp16 runs wrap each chunk as megatron does: half-precision weights, float32 loss inputs."""
    return Float16Module(config, chunk) if config.bf16 or config.fp16 else chunk


def build_optimizer(args: argparse.Namespace, policy: list):
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16, params_dtype=params_dtype(args),
        use_distributed_optimizer=args.use_distributed_optimizer), policy)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.lr_decay_iters or args.train_iters,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters, wd_incr_style="constant",
        # a resumed run follows its own arguments' schedule from the saved step on (a larger train_iters
        # stretches the decay); checkpoint.py reports what changed
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False)
    return optimizer, scheduler


def train(args: argparse.Namespace, device: devices.Device, args_file: str,
          weights: tuple[weight_sources.WeightSource, ...]) -> int:
    """The training loop; returns the process's exit code (0, or EXIT_PREEMPTED after a SIGTERM's save)."""
    preemption = Preemption(enabled=args.save is not None and not args.dpoc_measure_memory)
    check_start(args, args_file)
    initialize_parallel(args)
    dataset = PairwiseDataset(args.data_path, args.seq_length, args_file, args.tokenizer_name_or_path)
    # before any model is built: a missing or stale file stops the run at once
    precomputed = precompute.shared_table(args, args_file, len(dataset)) \
        if args.dpoc_reference == "precomputed" else None
    config = transformer_config(args, device)
    policy, reference = build_models(args, config, weights)
    optimizer, scheduler = build_optimizer(args, policy)
    config.no_sync_func = [c.no_sync for c in policy] if len(policy) > 1 else policy[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss

    objective = Objective(args.dpo_loss_type, args.dpo_beta, args.dpo_label_smoothing, args.pref_ftx)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    batching = Batching.from_args(args, same_length=uniform_micro_batch_length(args))
    checkpoints = Checkpointer(args, args_file, device, policy, optimizer, scheduler, len(dataset))
    # the memory probe measures step 1 of a fresh model and stops: it reads and writes no checkpoint
    start, notes = (0, ["memory probe: step 1 only, no checkpoint is read or written"]) \
        if args.dpoc_measure_memory else checkpoints.resume()
    log = _open_log(args, device, dp_size, start, weights, precomputed) if dist.get_rank() == 0 else None
    say = log.line if log else None
    for note in [*(f"warning: {w}" for w in dataset.warnings), *notes] if log else ():
        log.line(note)
    for step in range(start, args.train_iters):
        started = time.perf_counter()
        batches = rank_micro_batches(dataset, step, batching, dp_rank, dp_size, device.current())
        if precomputed is None:
            reference_pass(reference, batches)
        else:
            batches = [precomputed.fill(b) for b in batches]
        for chunk in policy:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        saved = memory_probe.SavedTensors(policy) if args.dpoc_measure_memory else None
        with saved.recording() if saved else contextlib.nullcontext():
            per_micro_batch = policy_pass(policy, batches, objective)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        _, grad_norm, _ = optimizer.step()
        if saved:  # after the first update, when the optimizer's state exists
            memory_probe.write(args.dpoc_run_dir, memory_probe.static_bytes(policy, reference, optimizer), saved)
            break
        scheduler.step(increment=1)
        record = _step_metrics(per_micro_batch, batches, args.global_batch_size, device)
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
              weights: tuple[weight_sources.WeightSource, ...], precomputed) -> RunLog:
    log = RunLog(args.dpoc_run_dir, args.train_iters, start, args.tensorboard_dir)
    log.line(f"dpoc runtime: {dist.get_world_size()} processes on {device.kind}, "
             f"tp={args.tensor_model_parallel_size} pp={args.pipeline_model_parallel_size} "
             f"ep={args.expert_model_parallel_size} dp={dp_size}, plan {args.dpoc_plan_hash or '-'}")
    log.line(f"weights: policy from {weights[0].describe()}, reference from {weights[1].describe()}"
             + (f" (precomputed log-probs: {precomputed.path})" if precomputed is not None else ""))
    return log


def _step_metrics(per_micro_batch: list[dict], batches: list, global_batch: int, device: devices.Device
                  ) -> dict[str, float]:
    """Means over all pairs of the step: the last pipeline stage's first tensor-parallel rank of each
    data-parallel replica contributes its micro-batches' sums and token counts; one all-reduce over the world
    adds them up. `fill`: real tokens / tokens of the rows they were given."""
    contributes = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                   and parallel_state.get_tensor_model_parallel_rank() == 0
                   and parallel_state.get_context_parallel_rank() == 0)
    values = torch.zeros(len(METRIC_KEYS) + 2, dtype=torch.float64, device=device.current())
    if contributes:
        for metrics in per_micro_batch:
            values[:-2] += torch.stack([metrics[k].double() for k in METRIC_KEYS])
        values[-2] = sum(b.real_tokens for b in batches)
        values[-1] = sum(b.row_tokens for b in batches)
    dist.all_reduce(values)
    record = {k: float(v) / global_batch for k, v in zip(METRIC_KEYS, values[:-2].tolist(), strict=True)}
    record["fill"] = float(values[-2] / values[-1])
    record["tokens"] = float(values[-2])
    return record


if __name__ == "__main__":  # dist checkpointing spawns helper processes that re-import this module
    sys.exit(main())
