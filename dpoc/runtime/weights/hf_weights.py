"""Hugging Face safetensors straight into this rank's model chunks, each rank reading only its own slices.

The model's own `sharded_state_dict()` says what every parameter is globally (key, global shape, this rank's
offset — for every tp / pp / vpp / ep / etp alike; `sharded.fill` walks it, factories included);
`weight_map` says which HF rows make up that global tensor; `safe_open(...).get_slice(name)[rows, cols]`
reads just this rank's part. A layout megatron can checkpoint is a layout this loads. Peak host memory: the
rank's parameters plus one tensor being read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from safetensors import safe_open

from dpoc.contract.architecture import Architecture
from dpoc.contract.errors import DpocError, Problem
from dpoc.runtime.weights import safetensors_header, sharded, weight_map
from dpoc.runtime.weights.safetensors_header import INDEX, SINGLE

# tensors a Hugging Face directory may hold that no megatron weight comes from
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HfWeights:
    """A Hugging Face weights directory: which safetensors file holds each tensor, files opened on demand."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        damaged = safetensors_header.problems(path)  # before safe_open, which fails deep inside on a cut file
        if damaged:
            raise DpocError(damaged)
        index = Path(path) / INDEX
        if index.is_file():
            self.files = dict(json.loads(index.read_text())["weight_map"])
        elif (Path(path) / SINGLE).is_file():
            with safe_open(str(Path(path) / SINGLE), "pt") as f:
                self.files = dict.fromkeys(f.keys(), SINGLE)
        else:
            raise DpocError([Problem(self.path, "(directory)", f"no {SINGLE} and no {INDEX} (valid: Hugging Face "
                                     "weights saved as safetensors)")])
        self._open: dict[str, object] = {}

    def _file(self, name: str):
        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(os.path.join(self.path, file), "pt")
        return self._open[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        from dpoc.runtime.weights.safetensors_out import torch_dtype

        return torch_dtype(self._file(name).get_slice(name).get_dtype())

    def read(self, name: str, where: tuple[slice, ...]) -> torch.Tensor:
        """Rows/columns `where` of tensor `name`, read without the rest of the tensor."""
        return self._file(name).get_slice(name)[where]

    def problems(self, arch: Architecture) -> list[Problem]:
        """Every tensor the architecture needs that is missing or of another shape, and every tensor it would
        silently leave out (a weight of an architecture dpoc does not map)."""
        needed = weight_map.hf_tensors(arch)
        out = []
        for name, shape in needed.items():
            if name not in self.files:
                out.append(Problem(self.path, name, f"missing (the model needs shape {list(shape)})"))
            elif self.shape(name) != shape:
                out.append(Problem(self.path, name, f"shape {list(self.shape(name))} in {self.files[name]}, "
                                   f"but the model needs {list(shape)}"))
        tied_head = {"lm_head.weight"} if arch.tie_embeddings else set()
        for name in sorted(set(self.files) - set(needed) - tied_head):
            if not name.endswith(_IGNORED_SUFFIXES):
                out.append(Problem(self.path, name, "is not a weight of this architecture: loading would drop it"))
        return out


def load(chunks: list[torch.nn.Module], weights: HfWeights, arch: Architecture) -> None:
    """Fill every parameter of every chunk from the HF tensors, this rank's slices only."""
    sharded.fill(chunks, lambda sh: read_sharded(sh, weights, arch))


def read_sharded(sh: ShardedTensor, weights: HfWeights, arch: Architecture, dtype: torch.dtype | None = None
                 ) -> torch.Tensor:
    """This rank's part of one ShardedTensor (in `dtype`, default its own): for each index (layer, expert) it
    covers, the pieces' rows in its row range, its columns of the rest."""
    k = weight_map.index_axes(sh.key)

    def block(index: tuple[int, ...], rows: range, rest: tuple[slice, ...]) -> torch.Tensor:
        expected = weight_map.hf_shape(sh.key, index, arch)
        if tuple(sh.global_shape[k:]) != expected:
            raise RuntimeError(f"{sh.key}{list(index)}: global shape {list(sh.global_shape[k:])} in the model, "
                               f"{list(expected)} from the Hugging Face tensors")
        return _rows(weight_map.pieces(sh.key, index, arch), rows, rest, weights)

    return sharded.assemble(sh, block, dtype)


def _rows(pieces: tuple[weight_map.Piece, ...], rows: range, rest: tuple[slice, ...], weights: HfWeights
          ) -> torch.Tensor:
    """Rows `rows` of the concatenation of `pieces`, reading only the overlapping part of each."""
    parts, start = [], 0
    for piece in pieces:
        lo, hi = max(rows.start, start), min(rows.stop, start + piece.rows)
        if lo < hi:
            first = piece.start + lo - start
            parts.append(weights.read(piece.name, (slice(first, first + hi - lo), *rest)))
        start += piece.rows
    return parts[0] if len(parts) == 1 else torch.cat(parts)
