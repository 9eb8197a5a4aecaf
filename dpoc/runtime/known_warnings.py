"""The library warnings every run printed (~40 lines on the tiny CPU job) that say nothing about the run.

Filtered when the runtime package is first imported — before megatron-core, whose imports raise most of them —
each by its category and the start of its exact message, so any other warning, and these same words from
another category, still show. Each entry says where it comes from and why it is harmless.
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
)


def silence() -> None:
    for category, message in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category)
