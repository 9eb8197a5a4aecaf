"""A random initialisation that does not depend on the parallel layout.

megatron-core draws initial weights from one RNG stream per rank, so a pipeline stage or an expert shard
sees different numbers than the same weight in a one-process run. Here every weight is drawn from its
own generator, seeded by the run seed and the weight's *global* identity (its distributed-checkpoint key
and layer/expert index), as the full unsharded tensor; each rank keeps its slice. Any layout of the same
seed therefore starts from the same model — which is what makes layouts comparable.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.transformer import TransformerConfig

from dpoc.runtime.sharded import sharded_tensors

# megatron-core's "output layer" init: projections that add into the residual stream are scaled down
_RESIDUAL_OUTPUTS = ("linear_proj.weight", "linear_fc2.weight")


def initialize(chunks: Iterable[torch.nn.Module], config: TransformerConfig, seed: int) -> None:
    """Overwrite every matrix/embedding weight with its layout-independent draw; norms keep ones and
    biases zeros, as megatron-core initialises them."""
    for chunk in chunks:
        for sh in sharded_tensors(chunk.sharded_state_dict()):
            std = _std(sh.key, config)
            if std is not None:
                _fill(sh, seed, std)


def _std(key: str, config: TransformerConfig) -> float | None:
    if not key.endswith("weight") or "norm" in key:
        return None
    if key.endswith(_RESIDUAL_OUTPUTS):
        return config.init_method_std / math.sqrt(2.0 * config.num_layers)
    return config.init_method_std


@torch.no_grad()
def _fill(sh: ShardedTensor, seed: int, std: float) -> None:
    """Draw the global tensor for this key (per layer/expert index on the prepended axes) and copy the
    rank's slice into the parameter."""
    prepend = sh.prepend_axis_num
    identity = f"{seed}|{sh.key}|{tuple(sh.global_offset[:prepend])}"
    digest = hashlib.sha256(identity.encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    full = torch.randn(sh.global_shape[prepend:], generator=generator, dtype=torch.float32) * std
    offsets = sh.global_offset[prepend:]
    rank_slice = tuple(slice(o, o + n) for o, n in zip(offsets, sh.local_shape, strict=True))
    sh.data.copy_(full[rank_slice].to(sh.data.dtype))
