"""Walking a model's sharded state dict: every ShardedTensor, factories built (what a checkpoint stores)."""

from __future__ import annotations

from collections.abc import Iterator

from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.utils import extract_sharded_base


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
