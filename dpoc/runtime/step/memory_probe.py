"""Count, on this rank, the bytes the planner's memory model predicts (`--dpoc-measure-memory`).

The static part is read off the tensors themselves: policy parameters, the gradient buffers the DDP wrapper
accumulates into (`main_grad`, whole storages with megatron's bucket padding), every tensor in the
optimizer's state plus any master copies it steps that are not the policy's own storage, and the reference's
parameters. Activations are the bytes autograd saves for backward during the policy's forward of the first
micro-batch, caught with `torch.autograd.graph.saved_tensors_hooks`: each storage once (views of one
storage are not double counted), parameters excluded. Bytes saved inside a transformer layer are reported
apart from those saved elsewhere (embedding, final norm, output layer, loss). The planner compares these
with `dpoc.planner.memory.estimate_memory` in `bench/memory_vs_measured.py`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import TransformerLayer

from dpoc.common.atomic import write_atomically

MEMORY_DIR = "memory"


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the storage behind a tensor."""
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _unique_bytes(tensors: Iterable[torch.Tensor], exclude: set[int] = frozenset()) -> int:
    seen = dict(_storage(t) for t in tensors)
    return sum(n for ptr, n in seen.items() if ptr not in exclude)


def _parameters(chunks: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [p for chunk in chunks for p in chunk.parameters()]


class SavedTensors:
    """Bytes autograd saves during the first forward of the policy (one micro-batch per chunk)."""

    def __init__(self, policy: list[torch.nn.Module]):
        self.exclude = {_storage(p)[0] for p in _parameters(policy)}
        self.forwards = 0
        self.depth = 0  # > 0 while inside a transformer layer
        self.storages: dict[int, tuple[int, str]] = {}  # address: (bytes, "layers" or "other")
        self.handles = []
        for chunk in policy:
            self.handles.append(chunk.register_forward_pre_hook(self._next_forward))
            for module in chunk.modules():
                if isinstance(module, TransformerLayer):
                    self.handles.append(module.register_forward_pre_hook(self._enter))
                    self.handles.append(module.register_forward_hook(self._leave))

    def _next_forward(self, *_) -> None:
        self.forwards += 1

    def _enter(self, *_) -> None:
        self.depth += 1

    def _leave(self, *_) -> None:
        self.depth -= 1

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        if self.forwards == 1:
            ptr, nbytes = _storage(t)
            if ptr not in self.exclude and ptr not in self.storages and nbytes:
                self.storages[ptr] = (nbytes, "layers" if self.depth else "other")
        return t

    def bytes(self, region: str) -> int:
        return sum(n for n, r in self.storages.values() if r == region)

    @contextmanager
    def recording(self) -> Iterator[SavedTensors]:
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                yield self
        finally:
            for handle in self.handles:
                handle.remove()


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside megatron's (possibly chained) optimizer."""
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        return [o for c in chained for o in _torch_optimizers(c)]
    return [optimizer.optimizer]


def static_bytes(policy: list[torch.nn.Module], reference: list[torch.nn.Module], optimizer) -> dict[str, int]:
    params = _parameters(policy)
    own = {_storage(p)[0] for p in params}
    torch_optimizers = _torch_optimizers(optimizer)
    states = [v for o in torch_optimizers for state in o.state.values() for v in state.values()
              if torch.is_tensor(v)]
    stepped = [p for o in torch_optimizers for group in o.param_groups for p in group["params"]]
    return {
        "weights": sum(p.numel() * p.element_size() for p in params),
        "params": sum(p.numel() for p in params),
        "gradients": _unique_bytes(p.main_grad for p in params if getattr(p, "main_grad", None) is not None),
        "gradients_unpadded": sum(p.main_grad.numel() * p.main_grad.element_size()
                                  for p in params if getattr(p, "main_grad", None) is not None),
        "optimizer": _unique_bytes(states) + _unique_bytes(stepped, exclude=own),
        "reference": sum(p.numel() * p.element_size() for p in _parameters(reference)),
    }


def write(run_dir: str, static: dict[str, int], saved: SavedTensors) -> Path:
    """This rank's counts as `<run_dir>/memory/rank-<r>.json` (written to a temporary name, then renamed)."""
    rank = torch.distributed.get_rank()
    record = {
        "rank": rank,
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "ep_rank": parallel_state.get_expert_model_parallel_rank(),
        "dp_rank": parallel_state.get_data_parallel_rank(),
        **static,
        "activations_layers": saved.bytes("layers"),
        "activations_other": saved.bytes("other"),
    }
    out = Path(run_dir) / MEMORY_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"rank-{rank}.json"
    write_atomically(path, json.dumps(record, indent=1) + "\n")
    return path
