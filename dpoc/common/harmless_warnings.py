"""The library warnings known to say nothing about a dpoc run, and the filter that hides exactly them.

Every process that imports megatron-core applies it first: the runtime's (`dpoc.runtime.known_warnings`, which
also shows every other warning once per node) and `dpoc preprocess`'s (`dpoc.data.pairwise`, whose indexed
datasets come from megatron-core). Each entry is a category and the start of the exact message, so any other
warning, and these same words from another category, still show; each says where it comes from and why it is
harmless.
"""

from __future__ import annotations

import warnings

KNOWN_HARMLESS: tuple[tuple[type[Warning], str], ...] = (
    # megatron-core at import: dpoc runs its local (non-TransformerEngine) layers and torch optimizers by design
    (UserWarning, r"Transformer Engine and Apex are not installed\. Falling back to "),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm"),
    # megatron-core 0.16's own TransformerConfig default (cuda_graph_scope="full") warns about itself; no run
    # here captures CUDA graphs
    (UserWarning, r"full scope is deprecated\. Use empty cuda_graph_scope to capture the whole layer"),
    # megatron-core's DistributedOptimizer.zero_grad reads `.grad` of its shard views of the parameters, which
    # are not leaves; it fills those `.grad` fields itself from main_grad before each step
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"),
    # torch 2.13 renamed the collectives megatron-core's gradient and parameter buffers call; the old names work
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    # on resume, megatron-core 0.16's torch_dist load strategy calls torch.distributed.checkpoint's old
    # `load_state_dict`, which torch 2.13 still serves under its new name `load`
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed in future versions\. Please use `load`"),
    # on resume, megatron-core's distributed checkpoints describe their shards with torch's ShardedTensor
    # metadata (their own file format), which torch deprecates in favour of DTensor for new code
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),
    # convert mcore-to-hf reads a checkpoint in its one process on purpose (torch.distributed.checkpoint no_dist)
    (UserWarning, r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load "
                  r"in a single process"),
)


def ignore() -> None:
    """Hide the known harmless warnings in this process (before megatron-core is imported: it raises most of them
    at import)."""
    for category, message in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category)
