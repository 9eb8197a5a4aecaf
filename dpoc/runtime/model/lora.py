"""LoRA adapters on megatron-core's tensor-parallel linears, sharded the way each weight is.

An adapted linear keeps its module (so the base's checkpoint keys and weight loading are untouched) and gains
`lora_A` [r, in] and `lora_B` [out, r]; its forward becomes base + (alpha/r) · B·A·dropout(x):
- column-parallel (`linear_qkv`, `linear_fc1`): B is split over tp like the weight's rows, A is replicated; the
  adapter reads the same gathered / copied input as the base, so the input gradient of both is reduced in the
  base's one collective;
- row-parallel (`linear_proj`, `linear_fc2`): A is split like the weight's columns, B is replicated; the
  adapter's partial product is added before the base's all-reduce / reduce-scatter: one collective.
The replicated factor's gradient (column A, row B) is then a per-rank partial sum; `reduce_partial_grads` adds
it over the linear's tp group after the data-parallel reduction. The base is frozen (requires_grad False), so
megatron's DDP gives it no gradient buffer and the optimizer no state. Expert linears (one adapter per expert)
use the expert tp group and keep megatron's `allreduce` marking, so their gradients reduce over the expert
data-parallel group.

`--lora-load` (`lora.init_from`): a PEFT adapter directory sets the policy's initial adapters and is kept again,
frozen, as a second adapter on the same linears (plain tensors outside the state dict: never trained, saved or
all-reduced), which the reference pass runs in place of the policy's, so the reference is base + initial adapter.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.tensor_parallel import layers as tp_layers
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from dpoc.contract import hf_config
from dpoc.contract.architecture import Architecture
from dpoc.contract.lora import Lora
from dpoc.runtime.model import seeded_init
from dpoc.runtime.weights import peft, sharded, weight_map

ADAPTER_PARAMS = ("lora_A", "lora_B")


def settings(args) -> Lora | None:
    """The run's LoRA settings from megatron.args (None: every parameter trains)."""
    if args.lora_r is None:
        return None
    return Lora(rank=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                targets=tuple(args.lora_target_modules), experts=args.dpoc_lora_experts,
                init_from=args.lora_load)


def is_adapter(name: str) -> bool:
    """Whether a parameter or checkpoint key names an adapter factor."""
    return any(p in name for p in ADAPTER_PARAMS)


def targets(chunk: torch.nn.Module, lora: Lora) -> Iterator[tuple[str, torch.nn.Module]]:
    """The chunk's linears that get adapters: the chosen names, experts' only with `lora.experts` (shared
    experts count as dense MLP), never the router."""
    for name, module in chunk.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in lora.targets:
            continue
        if not isinstance(module, (tp_layers.ColumnParallelLinear, tp_layers.RowParallelLinear)):
            continue
        if ".experts." in name and not lora.experts:
            continue
        yield name, module


def attach(chunks: Iterable[torch.nn.Module], lora: Lora, seed: int, gated: bool) -> None:
    """Freeze every base parameter and give each target linear its adapter: B zero, A drawn like PEFT's default
    (kaiming-uniform, a = sqrt(5)) from a generator seeded by the run seed and A's global identity, so every
    layout starts from the same adapters."""
    chunks = list(chunks)
    for chunk in chunks:
        chunk.requires_grad_(False)
        for name, linear in list(targets(chunk, lora)):
            _adapt(linear, lora, gated and name.endswith("linear_fc1"))
        embedding = getattr(_unwrapped(chunk), "embedding", None)
        if embedding is not None:
            embedding.register_forward_hook(_output_requires_grad)
    with torch.no_grad():
        for chunk in chunks:
            for sh in sharded.sharded_tensors(chunk.sharded_state_dict()):
                if sh.key.endswith("lora_A"):
                    sh.data.copy_(sharded.assemble(sh, partial(_kaiming_block, sh, seed)))


def _unwrapped(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _output_requires_grad(module, inputs, output: torch.Tensor) -> torch.Tensor:
    """The frozen embedding's output requires grad, as the embedding's own weight would make it: full recompute's
    reentrant checkpoint of a layer gives its parameters (the adapters) no gradient when its input has none."""
    return output.requires_grad_(True)


def load_initial(chunks: Iterable[torch.nn.Module], args, lora: Lora) -> None:
    """`--lora-load`: every rank's shard of the PEFT adapter into the attached adapters, and the same values kept
    as each linear's frozen reference adapter. A resume then overwrites the policy's with the trained ones."""
    chunks = list(chunks)
    values = {}
    for site, pair in peft.load(args.lora_load, Architecture.of(hf_config.architecture_from_args(args)),
                                lora).items():
        key, index = site.weight()
        for part, tensor in zip(ADAPTER_PARAMS, pair, strict=True):
            values[(key.removesuffix("weight") + part, index)] = tensor

    def read(sh: ShardedTensor) -> torch.Tensor:
        if not is_adapter(sh.key):
            return sh.data
        return sharded.assemble(sh, lambda index, rows, rest: values[(sh.key, index)][
            (slice(rows.start, rows.stop), *rest)])

    sharded.fill(chunks, read)
    for chunk in chunks:
        for m in chunk.modules():
            if hasattr(m, "dpoc_lora"):
                m.dpoc_lora.reference = (m.lora_A.detach().clone(), m.lora_B.detach().clone())


def initial_a(seed: int, key: str, index: tuple[int, ...], shape: tuple[int, int]) -> torch.Tensor:
    """The full [r, in] A that `attach` gives the adapter `key` (its checkpoint key, `...lora_A`) at one
    layer/expert index: kaiming_uniform_(a=sqrt(5)), U(-1/sqrt(in), 1/sqrt(in)), from the seed and the key alone."""
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=seeded_init.generator(seed, key, index), dtype=torch.float32) * 2 - 1) * bound


def initial_adapters(arch: Architecture, lora: Lora, seed: int) -> dict[peft.Site, peft.Pair]:
    """Every adapter as `attach` starts it under `seed` (A drawn, B zero), in global shapes: what another trainer
    (bench/lora.py's PEFT side) loads to start from the same adapters."""
    out = {}
    for site in peft.sites(arch, lora):
        key, index = site.weight()
        out_features, in_features = weight_map.hf_shape(key, index, arch)
        a = initial_a(seed, key.removesuffix("weight") + "lora_A", index, (lora.rank, in_features))
        out[site] = (a, torch.zeros(out_features, lora.rank))
    return out


def _kaiming_block(sh: ShardedTensor, seed: int, index: tuple[int, ...], rows: range,
                   rest: tuple[slice, ...]) -> torch.Tensor:
    """This rank's block of `initial_a` at one layer/expert index."""
    full = initial_a(seed, sh.key, index, tuple(sh.global_shape[len(index):]))
    return full[(slice(rows.start, rows.stop), *rest)]


def _adapt(linear: torch.nn.Module, lora: Lora, swiglu: bool) -> None:
    column = isinstance(linear, tp_layers.ColumnParallelLinear)
    out_local, in_local = linear.weight.shape  # each factor is split, or not, on the weight's own axis
    dtype, device = linear.weight.dtype, linear.weight.device
    linear.lora_A = torch.nn.Parameter(torch.zeros(lora.rank, in_local, dtype=dtype, device=device))
    linear.lora_B = torch.nn.Parameter(torch.zeros(out_local, lora.rank, dtype=dtype, device=device))
    sharded_factor, replicated = (linear.lora_B, linear.lora_A) if column else (linear.lora_A, linear.lora_B)
    tp_layers.set_tensor_model_parallel_attributes(sharded_factor, True, 0 if column else 1, 1)
    for p in (linear.lora_A, linear.lora_B):
        p.allreduce = getattr(linear.weight, "allreduce", True)
    replicated.dpoc_partial_group = linear.tp_group  # its gradient is a per-rank partial sum over this group
    linear.dpoc_lora = _State(lora.alpha / lora.rank, lora.dropout)
    linear.forward = partial(_column_forward if column else _row_forward, linear)
    axes = {"weight": 0, "bias": 0, "lora_B": 0} if column else {"weight": 1, "lora_A": 1}
    linear.sharded_state_dict = partial(_sharded_state_dict, linear, axes, swiglu)


class _State:
    """An adapted linear's scaling, dropout, whether the policy's adapter is on (off: the reference pass) and the
    reference's frozen adapter (None: the reference is the base)."""

    def __init__(self, scaling: float, dropout: float):
        self.scaling, self.dropout, self.enabled = scaling, dropout, True
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None


def _factors(linear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (A, B) this pass runs: the policy's, or in the reference pass the reference's (None: no adapter)."""
    state = linear.dpoc_lora
    if state.enabled:
        return linear.lora_A, linear.lora_B
    if state.reference is None:
        return None
    return tuple(t.to(dtype) for t in state.reference)


def _dropped(linear, x: torch.Tensor, sharded_input: bool) -> torch.Tensor:
    """The adapter's input: dropout on it alone (the policy's, in training)."""
    state = linear.dpoc_lora
    if not (state.enabled and state.dropout and linear.training):
        return x
    # a tp-sharded input draws its mask from megatron's model-parallel RNG, a replicated one from the default
    with tensor_parallel.get_cuda_rng_tracker().fork() if sharded_input else contextlib.nullcontext():
        return F.dropout(x, state.dropout)


def _adapter(linear, x: torch.Tensor, sharded_input: bool) -> torch.Tensor | None:
    """The policy's adapter term, or in the reference pass the reference's (None: no adapter runs)."""
    factors = _factors(linear, x.dtype)
    if factors is None:
        return None
    a, b = factors
    return F.linear(F.linear(_dropped(linear, x, sharded_input), a), b) * linear.dpoc_lora.scaling


def grouped_adapter(linears: list[torch.nn.Module], x: torch.Tensor, counts: torch.Tensor, grouped,
                    sharded_input: bool) -> torch.Tensor | None:
    """The adapter term of one projection of the grouped-GEMM experts (`experts.GroupedExperts`): each local
    expert's A and B stacked like its weight, and the tokens' rows multiplied by their expert's, with the same
    grouped GEMM (`grouped(x, [experts, out, in], counts)`) as the base. None: no adapters (or the reference is
    the base)."""
    if not hasattr(linears[0], "dpoc_lora"):
        return None
    factors = [_factors(linear, x.dtype) for linear in linears]
    if factors[0] is None:
        return None
    a, b = (torch.stack(parts) for parts in zip(*factors, strict=True))
    low = grouped(_dropped(linears[0], x, sharded_input), a, counts)
    return grouped(low, b, counts) * linears[0].dpoc_lora.scaling


def _column_forward(linear, input_: torch.Tensor, weight: torch.Tensor | None = None,
                    runtime_gather_output: bool | None = None):
    """ColumnParallelLinear's forward with a frozen weight (no weight-gradient GEMM) plus the adapter, both on
    the one gathered (sequence parallel) or copied input."""
    if linear.explicit_expert_comm or linear.disable_grad_reduce or linear.tp_group.size() == 1:
        x = input_
    elif linear.sequence_parallel:
        x = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True, group=linear.tp_group)
    else:
        x = copy_to_tensor_model_parallel_region(input_, group=linear.tp_group)
    bias = linear.bias if not linear.skip_bias_add else None
    out = F.linear(x, linear.weight if weight is None else weight, bias)
    delta = _adapter(linear, x, sharded_input=False)
    if delta is not None:
        out = out + delta
    gather = linear.gather_output if runtime_gather_output is None else runtime_gather_output
    if gather:
        out = gather_from_tensor_model_parallel_region(out, group=linear.tp_group)
    return out, linear.bias if linear.skip_bias_add else None


def _row_forward(linear, input_: torch.Tensor):
    """RowParallelLinear's forward with a frozen weight plus the adapter's partial product, reduced together."""
    if not linear.input_is_parallel:
        input_ = tensor_parallel.scatter_to_tensor_model_parallel_region(input_, group=linear.tp_group)
    out = F.linear(input_, linear.weight)
    delta = _adapter(linear, input_, sharded_input=True)
    if delta is not None:
        out = out + delta
    if linear.explicit_expert_comm:
        pass  # the token dispatcher reduces expert outputs
    elif linear.sequence_parallel:
        out = reduce_scatter_to_sequence_parallel_region(out, group=linear.tp_group)
    else:
        out = reduce_from_tensor_model_parallel_region(out, group=linear.tp_group)
    if linear.skip_bias_add:
        return out, linear.bias
    return (out + linear.bias if linear.bias is not None else out), None


def _sharded_state_dict(linear, axes: dict[str, int], swiglu: bool, prefix: str = "", sharded_offsets=(),
                        metadata=None):
    """The linear's entries plus its adapter's, each split along the axis its factor is; fc1's B, like its
    weight, as the gate and up halves (SwiGLU), so the stored tensor does not depend on tp."""
    out = make_sharded_tensors_for_checkpoint(linear.state_dict(prefix="", keep_vars=True), prefix, axes,
                                              sharded_offsets, tp_group=linear.tp_group,
                                              dp_cp_group=metadata["dp_cp_group"])
    key = f"{prefix}lora_B"
    if swiglu:
        singleton = (metadata or {}).get("singleton_local_shards", False)
        out[key] = apply_swiglu_sharded_factory(out[key], sharded_offsets, singleton)
    return out


@contextlib.contextmanager
def adapters_off(chunks: Iterable[torch.nn.Module]) -> Iterator[None]:
    """The reference: the policy's adapters skipped (the base, or with `--lora-load` the base and its frozen initial
    adapter), in eval mode (the reference pass of a LoRA run)."""
    chunks = list(chunks)
    linears = [m for c in chunks for m in c.modules() if hasattr(m, "dpoc_lora")]
    modes = [c.training for c in chunks]
    for m in linears:
        m.dpoc_lora.enabled = False
    for c in chunks:
        c.eval()
    try:
        yield
    finally:
        for m in linears:
            m.dpoc_lora.enabled = True
        for c, mode in zip(chunks, modes, strict=True):
            c.train(mode)


def reduce_partial_grads(chunks: Iterable[torch.nn.Module]) -> None:
    """Add each replicated factor's partial gradient over its tp group (one coalesced all-reduce per group)."""
    by_group: dict[object, list[torch.Tensor]] = {}
    for chunk in chunks:
        for p in chunk.parameters():
            group = getattr(p, "dpoc_partial_group", None)
            grad = getattr(p, "main_grad", None) if hasattr(p, "main_grad") else p.grad
            if group is not None and group.size() > 1 and grad is not None:
                by_group.setdefault(group, []).append(grad)
    for group, grads in by_group.items():
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat, group=group)
        for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(synced)


def finalize_with_adapters(finalize):
    """megatron's `finalize_model_grads`, then the adapters' tp reduction. After it, not before: the data-parallel
    reduction may still be in flight until finalize waits for it (overlap_grad_reduce). Both are sums, so the
    order does not change the result; with the distributed optimizer each rank's reduced shard sits at the same
    place of every tp rank's buffer, so summing whole buffers over tp sums those shards."""
    def run(model, *args, **kwargs):
        result = finalize(model, *args, **kwargs)
        reduce_partial_grads(model)
        return result
    return run
