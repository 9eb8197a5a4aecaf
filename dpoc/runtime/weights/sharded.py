"""A model's sharded state dict as the one description of its parameters, for every layout.

megatron-core names each weight by a layout-free key whose global tensor has leading *index axes* (the global
layer; for routed experts also the global expert) and gives each rank its offset and shape in it. `fill`
sets every parameter of a rank's chunks from a function that produces one ShardedTensor's local data —
parameters stored through a factory (SwiGLU fc1 halves, grouped-GEMM expert weights) are produced as the
factory's pieces and merged back by the factory itself, exactly as a checkpoint load does. `assemble`
builds such local data index by index (layer, expert) from the rows and columns a rank holds.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import extract_sharded_base

from dpoc.runtime.weights.weight_map import index_axes

# (global index, rows of the global tensor, slices of its other axes) -> that block's values
Block = Callable[[tuple[int, ...], range, tuple[slice, ...]], torch.Tensor]


def assemble(sh: ShardedTensor, block: Block, dtype: torch.dtype | None = None) -> torch.Tensor:
    """This rank's data of `sh` (in `dtype`, default its own), one `block` per global index it covers."""
    k = index_axes(sh.key)
    offset = tuple(sh.global_offset)
    local = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
    dtype = dtype or sh.data.dtype
    rows = range(offset[k], offset[k] + local[k])
    rest = tuple(slice(o, o + n) for o, n in zip(offset[k + 1:], local[k + 1:], strict=True))
    indices = list(itertools.product(*(range(o, o + n) for o, n in zip(offset[:k], local[:k], strict=True))))
    if len(indices) == 1:  # one layer/expert: the block itself, without a second buffer when no cast is due
        return block(indices[0], rows, rest).to(dtype).reshape(sh.local_shape)
    out = torch.empty(local, dtype=dtype)
    for index in indices:
        out[tuple(i - o for i, o in zip(index, offset[:k], strict=True))].copy_(block(index, rows, rest))
    return out.view(sh.local_shape)


@torch.no_grad()
def fill(chunks: Iterable[torch.nn.Module], read: Callable[[ShardedTensor], torch.Tensor]) -> None:
    """Set every parameter of every chunk from `read` (one ShardedTensor's local data at a time: peak memory
    is the parameters plus one tensor)."""
    for chunk in chunks:
        targets = {k: v for k, v in chunk.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}
        filled = set()
        for name, entry in chunk.sharded_state_dict().items():
            if isinstance(entry, ShardedObject):
                continue
            if isinstance(entry, ShardedTensorFactory):
                built = entry.build()
                value = entry.merge_fn([read(sh) for sh in built] if isinstance(built, list) else read(built))
            elif isinstance(entry, ShardedTensor):
                value = read(entry)
            else:
                raise TypeError(f"{name}: unexpected sharded state entry {type(entry).__name__}")
            targets[name].copy_(value.view(targets[name].shape))
            filled.add(name)
        missing = sorted(set(targets) - filled)
        if missing:  # a parameter outside the sharded state dict would keep whatever it held
            raise RuntimeError(f"parameters without a sharded-state-dict entry: {missing}")


def sharded_tensors(state: dict) -> Iterator[ShardedTensor]:
    """The ShardedTensors of a sharded state dict, with each factory's pieces in place of the factory."""
    sharded, _ = extract_sharded_base(state)
    for leaf in leaves(sharded):
        if isinstance(leaf, ShardedTensorFactory):
            yield from (t for t in leaves(leaf.build()) if isinstance(t, ShardedTensor))
        elif isinstance(leaf, ShardedTensor):
            yield leaf


def leaves(tree: object) -> Iterator[object]:
    if isinstance(tree, dict):
        for v in tree.values():
            yield from leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from leaves(v)
    else:
        yield tree
