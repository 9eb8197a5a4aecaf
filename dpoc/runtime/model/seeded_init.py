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

from dpoc.runtime.weights import sharded, weight_map

# megatron-core's "output layer" init: projections that add into the residual stream are scaled down
_RESIDUAL_OUTPUTS = ("linear_proj.weight", "linear_fc2.weight")


def initialize(chunks: Iterable[torch.nn.Module], config: TransformerConfig, seed: int) -> None:
    """Overwrite every matrix/embedding weight with its layout-independent draw; norms keep ones and
    biases zeros, as megatron-core initialises them."""
    sharded.fill(chunks, lambda sh: _draw(sh, seed, config))


def _std(key: str, config: TransformerConfig) -> float | None:
    if not key.endswith("weight") or "norm" in key:
        return None
    if key.endswith(_RESIDUAL_OUTPUTS):
        return config.init_method_std / math.sqrt(2.0 * config.num_layers)
    return config.init_method_std


def _draw(sh: ShardedTensor, seed: int, config: TransformerConfig) -> torch.Tensor:
    """The rank's slice of the global tensor drawn for this key at each layer/expert index (the tensor's own
    values for norms and biases)."""
    std = _std(sh.key, config)
    if std is None:
        return sh.data.clone()
    k = weight_map.index_axes(sh.key)

    def block(index: tuple[int, ...], rows: range, rest: tuple[slice, ...]) -> torch.Tensor:
        full = torch.randn(sh.global_shape[k:], generator=generator(seed, sh.key, index), dtype=torch.float32) * std
        return full[(slice(rows.start, rows.stop), *rest)]

    return sharded.assemble(sh, block)


def generator(seed: int, key: str, index: tuple[int, ...]) -> torch.Generator:
    """The generator of one weight's draw at one layer/expert index: a function of its global identity only."""
    digest = hashlib.sha256(f"{seed}|{key}|{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
