"""What the ranks of a sharded model must hold alike after a step, compared across the ranks that hold it.

Each rank's own result can be right against a CPU reference while the ranks disagree with one another: a tp
rank seeded apart from its peers, a replicated weight that one rank changed, a gradient that skipped its
reduction. megatron-core keeps these alike by construction (the same seed in every tp rank, the reductions in
its layers and in finalize_model_grads), so nothing else notices when they are not; the run then trains on
copies that drift. The device check (`device_check.py`) compares, after its one step:

- each parameter across the ranks that hold the same copy of it (`replica_group`): a dense one not split over
  tp across the tensor-and-data-parallel group, a dense tp shard across the data-parallel group, an expert's
  across the expert-data-parallel group;
- the gradient of each dense parameter not split over tp (the norms, the router) across the tp group;
- the per-token loss across every rank, when every rank ran the same micro-batch (the check feeds them one).

Each rank takes its group's first rank's copy (broadcast in slices of `SLICE` elements, so a large embedding
needs no second full copy) and measures its own largest difference against the largest value; the ranks then
share their findings, so every rank knows the first tensor on which some rank differs, and the first such rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

SLICE = 1 << 24  # elements broadcast at once


@dataclass(frozen=True)
class Compared:
    what: str  # what a failure names: "decoder.final_layernorm.weight after the step"
    tensor: torch.Tensor
    group: dist.ProcessGroup


@dataclass(frozen=True)
class Disagreement:
    what: str
    rank: int  # the first rank that differs
    source: int  # the rank whose copy it differs from
    error: float  # its largest difference over the largest value

    def __str__(self) -> str:
        """What the differing rank says: `<what> differs from rank 0's: max error 0.01 of the largest value`."""
        return f"{self.what} differs from rank {self.source}'s: max error {self.error:.3g} of the largest value"


def replica_group(name: str, param: torch.nn.Parameter) -> dist.ProcessGroup:
    """The ranks holding the same copy of parameter `name` (pipeline and context parallelism at 1)."""
    split = bool(getattr(param, "tensor_model_parallel", False))
    if ".experts." in name:  # routed experts: split over ep (and etp), the same on each expert-data rank
        return parallel_state.get_expert_data_parallel_group()
    if split:
        return parallel_state.get_data_parallel_group()
    return parallel_state.get_tensor_and_data_parallel_group()


def after_step(model: list[torch.nn.Module], losses: torch.Tensor | None) -> Iterator[Compared]:
    """What `model`'s ranks must hold alike after a step (its gradients still in their buffers); with `losses`,
    the per-token losses of one micro-batch that every rank ran."""
    tp = parallel_state.get_tensor_model_parallel_group()
    named = [(_plain(name), param) for chunk in model for name, param in chunk.named_parameters()]
    for name, param in named:
        yield Compared(f"{name} after the step", param.detach(), replica_group(name, param))
    for name, param in named:
        grad = getattr(param, "main_grad", None)
        if grad is not None and ".experts." not in name and not getattr(param, "tensor_model_parallel", False):
            yield Compared(f"the gradient of {name}", grad, tp)
    if losses is not None:
        yield Compared("the per-token loss", losses.detach(), dist.group.WORLD)


def _plain(name: str) -> str:
    """The parameter's name in the model, without its wrappers' `module.` (DDP, the precision wrapper)."""
    while name.startswith("module."):
        name = name.removeprefix("module.")
    return name


def first_disagreement(compared: list[Compared], tolerance: float) -> Disagreement | None:
    """The first compared tensor on which some rank's copy differs from its group's first rank's by more than
    `tolerance` of the largest value (collective: every rank calls it with the same list, and gets the same
    answer)."""
    here = compared[0].tensor.device if compared else torch.device("cpu")
    found = torch.zeros(len(compared), 2, dtype=torch.float32, device=here)  # (error, source) per tensor
    for i, item in enumerate(compared):
        ranks = dist.get_process_group_ranks(item.group)
        found[i, 1] = ranks[0]
        if len(ranks) > 1:
            found[i, 0] = _error(item.tensor, ranks[0], item.group)
    every = [torch.empty_like(found) for _ in range(dist.get_world_size())]
    dist.all_gather(every, found)
    errors = torch.stack(every).cpu()  # [rank, tensor, (error, source)]
    for i, item in enumerate(compared):
        bad = (~(errors[:, i, 0] <= tolerance)).nonzero().flatten().tolist()  # NaN counts as differing
        if bad:
            rank = bad[0]
            return Disagreement(item.what, rank, int(errors[rank, i, 1]), float(errors[rank, i, 0]))
    return None


def _error(tensor: torch.Tensor, source: int, group: dist.ProcessGroup) -> torch.Tensor:
    """max |mine - source's| / max |source's|, on the device (a 0-d float32 tensor)."""
    flat = tensor.detach().reshape(-1)
    worst = torch.zeros((), dtype=torch.float32, device=flat.device)
    largest = torch.zeros((), dtype=torch.float32, device=flat.device)
    for start in range(0, flat.numel(), SLICE):
        mine = flat[start:start + SLICE]
        theirs = mine.clone()
        dist.broadcast(theirs, src=source, group=group)
        worst = torch.maximum(worst, (mine.float() - theirs.float()).abs().max())
        largest = torch.maximum(largest, theirs.float().abs().max())
    return worst / largest.clamp_min(1e-12)
