"""The device self-check (`dpoc preflight BUILD --device`): proves in seconds, on the node, that this build's
device path works, before torchrun starts the job.

It runs in the group `contract.check_group` sizes for the plan (one process, or a torchrun group of local
processes started by `dpoc/launch/preflight.py`, each on its own device), inside the device bridge the runtime
uses. Every process runs each kernel path the runtime will run for this build, forward and backward, on its
device in the run's precision, at its rank's shapes, and compares every output and gradient with the same
function computed in float32 on the CPU: a collective over the group on the group's device, the norm, the
rotary embedding, SwiGLU, core attention (packed too with `--dpoc-packing`), the grouped experts GEMM (on a
slice of up to `EXPERT_SLICE` experts at the real sizes). Then the group builds one transformer layer of the
model at its real dimensions (with its embedding and output layer), sharded at the plan's tp / ep, seeded
through the runtime's RNG path, and runs one micro-batch (2 x micro_batch_size sequences of seq_length
tokens) forward and backward and one optimizer step, whose loss and gradient norm must be finite. Its line
gives the step's time and the memory it took (the slowest and the largest rank: the device allocator's peak,
or on the cpu, which counts no peak, what the step held: static state and saved activations) beside the
planner's estimate of the same (`dpoc/planner/one_layer.py`, which the CLI passes in). The first failure
stops it: one line naming the op and the kernel and why (exit 2).

Run by torchrun, `python -m dpoc.runtime.device_check ARGS --devices N [--planner JSON]` is one process of
the group: it reports through the folder in `check_group.REPORT_ENV`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
from megatron.core.transformer.enums import AttnMaskType

from dpoc.contract import megatron_args
from dpoc.contract.check_group import REPORT_ENV, CheckGroup, check_group, write_failure, write_lines
from dpoc.contract.errors import EXIT_USER_ERROR, DpocError, Problem
from dpoc.contract.kernels import FUSED
from dpoc.runtime.model import device as devices
from dpoc.runtime.model import fused
from dpoc.runtime.model.attention import PackedSequences, core_attention_class
from dpoc.runtime.model.experts import GROUPED
from dpoc.runtime.model.gpt import (
    build_chunks,
    check_supported,
    expert_path,
    norm_class,
    params_dtype,
    transformer_config,
)
from dpoc.runtime.step import memory_probe, replicas
from dpoc.runtime.step.session import (
    build_optimizer,
    ddp_config,
    init_distributed,
    initialize_parallel,
    sync_params,
)

EXPERT_SLICE = 4  # experts the grouped GEMM check multiplies (one gets no tokens): the kernel, not the model
TOKENS = 128  # sequence length of the op checks (at most --seq-length); the layer's is --seq-length
SEQUENCES_PER_PAIR = 2  # a micro-batch of pairs is chosen + rejected sequences
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 4e-2, torch.float16: 1e-2}  # max |error| / max |reference|


@dataclass(frozen=True)
class Op:
    name: str  # what the failure line names: the op and the kernel
    run: Callable[[], str]  # raises on failure; returns a note for the report


class Mismatch(Exception):
    pass


def run(args_file: str, node_devices: int = 1, planner: dict[str, float] | None = None) -> list[str]:
    """Every check for the build whose megatron.args is `args_file`, as one process of the group for a node of
    `node_devices` devices; rank 0's report lines (one per op). `planner`: the planner's figures for the layer
    (`one_layer.LayerEstimate`'s fields). DpocError on the first failure (a bad args file or a device stack
    that cannot load fails the same way)."""
    args = megatron_args.parse([f"@{args_file}"])
    device = devices.select(args.dpoc_device, args.distributed_backend, args_file, args.dpoc_core_attention)
    check_supported(args, args_file)
    group = check_group(args.tensor_model_parallel_size, args.expert_model_parallel_size,
                        args.expert_tensor_parallel_size, args.num_experts or 0, args.moe_router_topk or 0,
                        node_devices)
    one = one_layer(args, group)
    lines = []
    try:
        init_distributed(device)
        if dist.get_world_size() != group.processes:
            raise DpocError([Problem(args_file, "device check", f"started as {dist.get_world_size()} processes; "
                                     f"the layer's sharding ({group.describe()}) needs {group.processes}")])
        with devices.running_on(device):
            initialize_parallel(one)
            for op in ops(one, device, group, planner or {}):
                started = time.perf_counter()
                try:
                    note = op.run()
                    device.synchronize()
                except Exception as exc:  # a kernel's failure of any kind is the check's finding
                    raise DpocError([Problem(args_file, f"device check {op.name}",
                                             f"{reason(exc, planner)} (skip the check: DPOC_DEVICE_CHECK=0)")]) \
                        from None
                lines.append(f"device check: {op.name}: ok, {time.perf_counter() - started:.2f}s{note}")
    finally:
        if dist.is_initialized():
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
    return lines if dist_rank() == 0 else []


def dist_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def reason(exc: BaseException, planner: dict[str, float] | None) -> str:
    """The failure's first line; an out-of-memory one says so first, with the planner's expected peak."""
    why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in why.lower():
        expected = f" (the planner expects a peak of {_size(planner['peak_bytes'])})" if planner else ""
        return f"out of memory{expected}: {why}"
    return why


def one_layer(args: argparse.Namespace, group: CheckGroup) -> argparse.Namespace:
    """The run's model at one transformer layer, sharded as `group` says: no pipeline or context parallelism,
    sequence parallelism as the run has it (with tp > 1), the run's micro-batch size."""
    one = copy.copy(args)
    one.num_layers, one.num_layer_list, one.num_layers_per_virtual_pipeline_stage = 1, None, None
    one.pipeline_model_parallel_size = one.context_parallel_size = 1
    one.tensor_model_parallel_size, one.expert_model_parallel_size = group.tp, group.ep
    one.expert_tensor_parallel_size = group.etp
    one.sequence_parallel = bool(args.sequence_parallel) and group.tp > 1
    if args.num_experts:
        one.num_experts = group.num_experts
    return one


def ops(args: argparse.Namespace, device: devices.Device, group: CheckGroup, planner: dict[str, float]
        ) -> Iterator[Op]:
    """The kernel paths this build runs, in the order they are checked."""
    here, dtype = device.current(), params_dtype(args)
    config = transformer_config(args, device)
    kinds = FUSED[device.kind]
    tokens = min(TOKENS, args.seq_length)
    yield Op(f"collective all_reduce ({device.backend})", lambda: _all_reduce(here))
    norm = norm_class(True, "rms-norm" in kinds)(config, args.hidden_size, eps=args.norm_epsilon)
    yield Op(f"{args.normalization} ({_kernel('rms-norm', kinds)})", lambda: _norm(norm, args, here, dtype))
    yield Op(f"rotary ({_kernel('rotary', kinds)})", lambda: _rotary(config, args, tokens, here, dtype))
    if args.swiglu:
        yield Op(f"swiglu ({_kernel('swiglu', kinds)})",
                 lambda: _compare(_swiglu(kinds), _glu, [_randn(tokens, 2 * args.ffn_hidden_size)], here, dtype))
    kernel = devices.attention_kernel(device.kind, args.dpoc_core_attention)
    attention = core_attention_class(kernel)(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                             attention_type="self")
    yield Op(f"attention ({kernel})", lambda: _attention(attention, config, tokens, None, here, dtype))
    if args.dpoc_packing:
        packed = PackedSequences.of((tokens // 2, tokens // 4), tokens - tokens // 2 - tokens // 4)
        yield Op(f"attention ({kernel}, packed)", lambda: _attention(attention, config, tokens, packed, here, dtype))
    experts = expert_path(args)
    if experts in GROUPED:
        yield Op(f"moe experts ({experts})", lambda: _grouped(GROUPED[experts], args, here, dtype))
    stepped: list[replicas.Compared] = []
    yield Op(f"one layer forward, backward and optimizer step (experts {experts}, {group.describe()})",
             lambda: _layer(args, device, config, planner, stepped))
    if group.processes > 1:
        yield Op(f"replicas agree ({group.describe()})", lambda: _replicas(stepped, dtype))


def _kernel(name: str, kinds: tuple[str, ...]) -> str:
    return f"torch_npu.{fused.KERNELS[name]}" if name in kinds else "unfused"


def _randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_generator()) * scale


_GENERATOR: list[torch.Generator] = []


def _generator() -> torch.Generator:
    """One seeded CPU generator for every input: the same numbers on every node."""
    if not _GENERATOR:
        _GENERATOR.append(torch.Generator().manual_seed(1234))
    return _GENERATOR[0]


def _compare(on_device: Callable, reference: Callable, inputs: list[torch.Tensor], here: torch.device,
             dtype: torch.dtype) -> str:
    """`on_device(*inputs)` on the device in `dtype` against `reference(*inputs)` in float32 on the CPU: the
    output and the gradient of every input, for one random output gradient."""
    ours = [x.to(here, dtype, copy=True).requires_grad_() for x in inputs]
    theirs = [x.clone().requires_grad_() for x in inputs]
    out, expected = on_device(*ours), reference(*theirs)
    grad = torch.randn(expected.shape, generator=_generator())
    out.backward(grad.to(here, out.dtype))
    expected.backward(grad)
    worst = 0.0
    grads = [(f"gradient of input {i}", a.grad, b.grad) for i, (a, b) in enumerate(zip(ours, theirs, strict=True))]
    for what, got, want in [("forward", out, expected), *grads]:
        error = _error(got, want)
        if not error <= TOLERANCE[dtype]:
            raise Mismatch(f"{what} differs from the CPU float32 result: max error {error:.3g} of the largest value "
                           f"{_tolerance(dtype)}")
        worst = max(worst, error)
    return f", max error {worst:.2g}"


def _error(got: torch.Tensor | None, want: torch.Tensor) -> float:
    if got is None:
        return math.inf
    got, want = got.detach().float().cpu(), want.detach()
    if got.shape != want.shape:
        raise Mismatch(f"shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def _all_reduce(here: torch.device) -> str:
    values = torch.arange(4, dtype=torch.float32, device=here)
    dist.all_reduce(values)
    expected = torch.arange(4, dtype=torch.float32) * dist.get_world_size()
    if not torch.equal(values.cpu(), expected):
        raise Mismatch(f"summed {values.cpu().tolist()}, expected {expected.tolist()}")
    return ""


def _norm(norm: torch.nn.Module, args: argparse.Namespace, here: torch.device, dtype: torch.dtype) -> str:
    norm.to(here)

    def on_device(x, weight):
        return torch.func.functional_call(norm, {"weight": weight}, (x,))

    def reference(x, weight):
        if args.normalization == "RMSNorm":
            return F.rms_norm(x, (x.shape[-1],), weight, args.norm_epsilon)
        return F.layer_norm(x, (x.shape[-1],), weight, None, args.norm_epsilon)

    return _compare(on_device, reference, [_randn(8, args.hidden_size), 1 + _randn(args.hidden_size, scale=0.1)],
                    here, dtype)


def _rotary(config, args: argparse.Namespace, tokens: int, here: torch.device, dtype: torch.dtype) -> str:
    """megatron's attention's rotary call (on npu: fused.npu_rotary) against t cos + rotate_half(t) sin."""
    from megatron.core.transformer import attention

    d = args.kv_channels
    inverse = 1.0 / args.rotary_base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.outer(torch.arange(tokens, dtype=torch.float32), inverse)
    freqs = torch.cat([angles, angles], dim=-1)[:, None, None, :]  # [s, 1, 1, d], as megatron's RotaryEmbedding
    group = parallel_state.get_context_parallel_group()

    def on_device(t):
        return attention.apply_rotary_pos_emb(t, freqs.to(here), config=config, cp_group=group)

    def reference(t):
        t1, t2 = t.chunk(2, dim=-1)
        return t * freqs.cos() + torch.cat([-t2, t1], dim=-1) * freqs.sin()

    return _compare(on_device, reference, [_randn(tokens, 2, args.num_attention_heads, d)], here, dtype)


def _swiglu(kinds: tuple[str, ...]) -> Callable:
    return fused.swiglu if "swiglu" in kinds else _glu


def _glu(x: torch.Tensor) -> torch.Tensor:
    gate, linear = x.chunk(2, dim=-1)
    return F.silu(gate) * linear


def _attention(module: torch.nn.Module, config, tokens: int, packed: PackedSequences | None, here: torch.device,
               dtype: torch.dtype) -> str:
    """Causal attention with grouped query heads, against softmax(q k^T scale + causal mask) v per sequence."""
    tp = parallel_state.get_tensor_model_parallel_world_size()  # the module holds this rank's heads
    heads, d = config.num_attention_heads // tp, config.kv_channels
    groups = (config.num_query_groups or config.num_attention_heads) // tp
    scale = module.scale if hasattr(module, "scale") else 1.0 / math.sqrt(d)
    batch = () if packed is not None else (2,)
    inputs = [_randn(tokens, *batch, heads, d), _randn(tokens, *batch, groups, d), _randn(tokens, *batch, groups, d)]

    def on_device(q, k, v):
        return module(q, k, v, None, packed_seq_params=packed)

    def reference(q, k, v):
        if packed is None:
            return torch.stack([_causal(q[:, b], k[:, b], v[:, b], scale) for b in range(q.shape[1])], dim=1) \
                .reshape(tokens, q.shape[1], -1)
        ends = torch.tensor(packed.segments).cumsum(0).tolist()
        parts = [_causal(q[s:e], k[s:e], v[s:e], scale) for s, e in zip([0, *ends[:-1]], ends, strict=True)]
        out = torch.cat(parts).reshape(tokens, -1)
        return torch.cat([out[: sum(packed.lengths)], out.new_zeros(packed.padding, out.shape[1])])

    return _compare(on_device, reference, inputs, here, dtype)


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence [s, heads, d] (k, v [s, groups, d]): plain causal attention in float32."""
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    mask = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).triu(1)
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(mask, -math.inf).softmax(-1), v)


def _grouped(kernel: Callable, args: argparse.Namespace, here: torch.device, dtype: torch.dtype) -> str:
    """The grouped GEMM on a slice of experts at the real sizes, uneven token counts, the last expert empty."""
    experts = max(2, min(EXPERT_SLICE, args.num_experts))
    counts = torch.tensor([3 + 2 * i for i in range(experts - 1)] + [0])
    hidden, ffn = args.hidden_size, 2 * args.moe_ffn_hidden_size if args.swiglu else args.moe_ffn_hidden_size
    inputs = [_randn(int(counts.sum()), hidden), _randn(experts, ffn, hidden, scale=hidden ** -0.5)]

    def reference(x, weights):
        return torch.cat([part @ w.t() for part, w in zip(x.split(counts.tolist()), weights, strict=True)])

    return _compare(lambda x, weights: kernel(x, weights, counts), reference, inputs, here, dtype)


def _layer(args: argparse.Namespace, device: devices.Device, config, planner: dict[str, float],
           stepped: list[replicas.Compared]) -> str:
    """One layer of the model on the device, built and stepped the runtime's way (its DDP and optimizer
    settings); the step's time and memory, the group's slowest and largest, beside the planner's. Fills
    `stepped` with what the ranks must then hold alike (every rank ran the same micro-batch)."""
    from megatron.core.transformer.module import Float16Module

    here = device.current()
    device.reset_peak_memory()
    chunk = build_chunks(config, args)[0]
    model = Float16Module(config, chunk) if config.bf16 or config.fp16 else chunk
    policy = DistributedDataParallel(config, ddp_config(args), model)
    optimizer, _ = build_optimizer(args, [policy])
    rows, tokens = SEQUENCES_PER_PAIR * args.micro_batch_size, args.seq_length  # one micro-batch of pairs
    ids = torch.randint(0, args.padded_vocab_size, (rows, tokens), generator=_generator()).to(here)
    positions = torch.arange(tokens).repeat(rows, 1).to(here)
    saved = memory_probe.SavedTensors([policy]) if device.kind == "cpu" else None
    device.synchronize()
    started = time.perf_counter()
    optimizer.zero_grad()
    with saved.recording() if saved else contextlib.nullcontext():
        losses = policy(ids, positions, None, labels=ids)
    loss = losses.float().mean()
    loss.backward()
    finalize_model_grads([policy])
    _, grad_norm, _ = optimizer.step()
    device.synchronize()
    step_s = time.perf_counter() - started
    loss = float(loss.detach())
    if not math.isfinite(loss) or grad_norm is None or not math.isfinite(grad_norm) or grad_norm <= 0:
        raise Mismatch(f"non-finite loss or gradient: loss {loss:.4g}, gradient norm {grad_norm} (must be finite "
                       "and positive)")
    if saved is not None:  # the cpu counts no peak: what the step held, as the planner counts it
        static = memory_probe.static_bytes([policy], [], optimizer)
        what, used = "held", static["weights"] + static["gradients"] + static["optimizer"] + \
            saved.bytes("layers") + saved.bytes("other")
        expected = planner.get("held_bytes")
    else:
        what, used, expected = "peak", device.peak_memory(), planner.get("peak_bytes")
    step_s, used = _slowest_and_largest(step_s, used, here)
    sync_params([policy])  # the replicas compare the gathered weights
    stepped.extend(replicas.after_step([policy], losses))
    time_note = f" (planner {planner['step_s']:.2f}s)" if "step_s" in planner else ""
    memory_note = f" (planner {_size(expected)}, {used / expected - 1:+.0%})" if expected else ""
    return (f", step {step_s:.2f}s{time_note}, {what} {_size(used)}{memory_note}, loss {loss:.3f}, "
            f"grad norm {grad_norm:.3g}")


def _replicas(stepped: list[replicas.Compared], dtype: torch.dtype) -> str:
    """The stepped layer's replicated weights, gradients and loss, alike on every rank that holds them: the
    first rank that differs fails, naming the tensor and the rank it differs from."""
    found = replicas.first_disagreement(stepped, TOLERANCE[dtype])
    compared = len(stepped)
    stepped.clear()  # the layer is freed with its last reference
    if found is not None and found.rank == dist.get_rank():
        raise Mismatch(f"{found} {_tolerance(dtype)}")
    return f", {compared} tensors compared"


def _tolerance(dtype: torch.dtype) -> str:
    return f"(tolerance {TOLERANCE[dtype]:g} in {str(dtype).removeprefix('torch.')})"


def _slowest_and_largest(seconds: float, nbytes: float, here: torch.device) -> tuple[float, float]:
    """The group's longest step time and largest memory (float32 on the device: no float64 there)."""
    both = torch.tensor([seconds, nbytes / 2**20], dtype=torch.float32, device=here)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return float(both[0]), float(both[1]) * 2**20


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    """One process of a torchrun group: the check, reported through the folder in REPORT_ENV."""
    parser = argparse.ArgumentParser(prog="python -m dpoc.runtime.device_check")
    parser.add_argument("args_file")
    parser.add_argument("--devices", type=int, required=True, help="the node's devices, as the plan has them")
    parser.add_argument("--planner", type=json.loads, default=None, help="the planner's figures (JSON)")
    options = parser.parse_args(argv)
    folder, rank = os.environ[REPORT_ENV], dist_rank()
    try:
        lines = run(options.args_file, options.devices, options.planner)
    except DpocError as exc:  # which process: on a node of many devices, which device
        found = exc.problems[0]
        write_failure(folder, rank, Problem(found.file, f"{found.where} on rank {rank}", found.message))
        return EXIT_USER_ERROR
    except Exception as exc:  # before any op: the group, the device stack
        write_failure(folder, rank, Problem(options.args_file, f"device check setup on rank {rank}",
                                            reason(exc, options.planner)))
        return EXIT_USER_ERROR
    if rank == 0:
        write_lines(folder, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
