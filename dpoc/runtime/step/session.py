"""What every program of the runtime does before its own work: parse megatron.args, check what needs no
process group, join torchrun's group, set up megatron-core's groups and RNG, and build the models and the
optimizer. Training (`train.py`), the precompute pass (`precompute.py`) and the converter all start here, so
neither program imports the other.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from dpoc.common.ports import free_port
from dpoc.contract import megatron_args
from dpoc.contract.errors import EXIT_USER_ERROR, DpocError, Problem
from dpoc.contract.lora import Lora
from dpoc.runtime.model import device as devices
from dpoc.runtime.model import lora
from dpoc.runtime.model.gpt import build_chunks, check_supported, params_dtype, virtual_pipeline_size
from dpoc.runtime.step import input_error
from dpoc.runtime.weights import weight_sources


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
        init_distributed(device)
        with devices.running_on(device):
            return body(args, device, args_file, weights)
    except DpocError as err:
        input_error.report(err.problems)
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


def init_distributed(device: devices.Device) -> None:
    """Join torchrun's process group; a bare `python -m` run becomes a one-process group on loopback."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.kind != "cpu":
        getattr(torch, device.kind).set_device(local_rank)
    dist.init_process_group(backend=device.backend, timeout=datetime.timedelta(minutes=30))



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
    (`weight_sources.sources`) before wrapping. Under LoRA the base is read at every start (a resume then loads
    only the adapters), and a reference of the base's weights is the policy itself (the same list), run with
    its adapters off: no second copy."""
    policy_source, reference_source = weights
    policy_config, reference_config = config, copy.copy(config)
    chunks = build_chunks(policy_config, args)
    adapters = lora.settings(args)
    base = weight_sources.lora_base(args, policy_source) if adapters else policy_source
    if base.kind != "resume":  # a resumed policy is read from its checkpoint once the optimizer exists
        weight_sources.load(base, chunks, config, args)
    if adapters:
        _attach(chunks, args, adapters)
    policy = [DistributedDataParallel(policy_config, ddp_config(args), _in_precision(policy_config, chunk),
                                      disable_bucketing=i > 0) for i, chunk in enumerate(chunks)]
    if args.dpoc_reference in ("precomputed", "none"):  # log-probs from a file, or a reference-free loss
        return policy, []
    if adapters and weight_sources.same_weights(base, reference_source):
        return policy, policy
    return policy, build_reference(args, reference_config, reference_source)


def build_reference_alone(args: argparse.Namespace, config, weights: tuple[weight_sources.WeightSource, ...]
                          ) -> list:
    """The frozen reference as training runs it, without a policy (the precompute pass): a LoRA run's reference
    of the base's weights is the base with `--lora-load`'s initial adapter frozen in (`build_models`), any other
    the reference's weights alone."""
    policy_source, reference_source = weights
    adapters = lora.settings(args)
    if adapters and args.lora_load:
        base = weight_sources.lora_base(args, policy_source)
        if weight_sources.same_weights(base, reference_source):
            return build_reference(args, config, base, adapters)
    return build_reference(args, config, reference_source)


def ddp_config(args: argparse.Namespace) -> DistributedDataParallelConfig:
    """The policy's gradient buffers. `overlap_grad_reduce`: each bucket's reduction (a reduce-scatter with the
    distributed optimizer) starts as soon as the last micro-batch's backward has filled it, overlapping the rest
    of the backward; finalize_model_grads waits for them. `--overlap-param-gather` (only with the distributed
    optimizer: `check_supported` refuses it alone): the optimizer's parameter all-gather moves into the next
    step's forward, bucket by bucket; whatever reads the weights between a step and the next forward calls
    `sync_params` first."""
    return DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True,
                                         overlap_param_gather=args.overlap_param_gather,
                                         use_distributed_optimizer=args.use_distributed_optimizer)


def sync_params(policy: list) -> None:
    """Gather every rank's updated shard now. With `overlap_param_gather` megatron-core's distributed
    optimizer leaves each rank's parameters updated only in its own shard until the next forward's pre-hooks
    gather them, so a checkpoint save, the memory probe or the device check's replica comparison right after
    a step would read stale shards. The next forward gathers again (the same values)."""
    for chunk in policy:
        if chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


def _attach(chunks: list, args: argparse.Namespace, adapters: Lora) -> None:
    """The adapters on the base's chunks, with `--lora-load` its initial values (and their frozen copy)."""
    lora.attach(chunks, adapters, args.seed, gated=args.swiglu)
    if args.lora_load:
        lora.load_initial(chunks, args, adapters)


def build_reference(args: argparse.Namespace, config, source: weight_sources.WeightSource,
                    adapters: Lora | None = None) -> list:
    """The frozen reference's chunks, filled from `source`, in eval mode and without gradients; with `adapters`
    the base's adapters too (the reference pass runs them off: with `--lora-load`, the initial adapter)."""
    chunks = build_chunks(config, args)
    weight_sources.load(source, chunks, config, args)
    if adapters is not None:
        _attach(chunks, args, adapters)
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
