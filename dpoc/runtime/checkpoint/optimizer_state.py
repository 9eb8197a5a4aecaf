"""The optimizer's part of a training checkpoint, fully reshardable, with torch's Adam.

Without apex or TransformerEngine (on cpu, and on Ascend) megatron-core's optimizers wrap `torch.optim.Adam`,
whose per-parameter `step` tensor the distributed optimizer's load path does not expect: a fresh optimizer
has no state for the load template (a bare assertion), the fully reshardable loader copies into every state
key and finds no `step` (KeyError), and megatron hands every parameter one shared `step` tensor, which Adam
then increments once per parameter per step (a silently drifting bias correction). So the common part of
the state (param groups, step) is not taken from the checkpoint: the step is saved as one number and every
parameter gets its own tensor; the groups' hyperparameters are this run's (the LR scheduler sets them).
That also makes the load independent of how many chained optimizers the layout builds (ep1: one, ep>1: a
dense and an expert one).
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import ChainedOptimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer


def sharding() -> dict:
    """megatron-core's sharding metadata, passed explicitly: without it the distributed optimizer defaults to a
    format 0.16 cannot load ("flattened_range is not supported"); fully_reshardable gathers each parameter's
    state whole, so tp/pp/ep/dp may all change; no chained-optimizer prefix, so ep1 and ep>1 keys agree.

    A new dict per call: megatron-core stores the data-parallel group it shards over into the dict it is given
    (`ensure_metadata_has_dp_cp_group`), so a shared one would hand a later process group's state dict the
    group of the first (a second run in one process then saves with the wrong replica ids)."""
    return {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True,
            "singleton_local_shards": False}


def parts(optimizer) -> list:
    return list(optimizer.chained_optimizers) if isinstance(optimizer, ChainedOptimizer) else [optimizer]


def is_distributed(optimizer) -> bool:
    return all(isinstance(part, DistributedOptimizer) for part in parts(optimizer))


def step_count(optimizer) -> int:
    """Adam's step, the same for every parameter (in the state with torch's Adam, in the param groups with
    apex/TE's FusedAdam); 0 before the first update."""
    steps = set()
    for part in parts(optimizer):
        inner = part.optimizer
        if _torch_adam(inner):
            steps |= {int(s["step"]) for s in inner.state.values() if "step" in s}
        else:
            steps |= {int(g["step"]) for g in inner.param_groups if "step" in g and g["params"]}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer steps differ between parameters: {sorted(steps)}")
    return steps.pop() if steps else 0


def allocate(optimizer) -> None:
    """Zero Adam state for every parameter that has none, so a fresh optimizer can build its load template."""
    for part in parts(optimizer):
        inner = part.optimizer
        if not _torch_adam(inner):
            continue  # apex/TE's FusedAdam: megatron allocates its state itself
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state.get(param):
                    inner.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                          "exp_avg_sq": torch.zeros_like(param)}


def sharded_state_dict(optimizer, model_state: dict, is_loading: bool) -> dict:
    return optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=sharding())


def grad_scaler_state(optimizer) -> dict | None:
    """fp16's loss scale (every chained optimizer keeps the same one); None without a scaler."""
    scaler = _grad_scaler(parts(optimizer)[0])
    return None if scaler is None else scaler.state_dict()


def restore(optimizer, loaded: dict, step: int, scaler: dict | None) -> None:
    """Put a loaded checkpoint's optimizer part (the load template's structure) into `optimizer`."""
    chain = parts(optimizer)
    if is_distributed(optimizer):
        pieces = [loaded] if len(chain) == 1 else [loaded[i] for i in range(len(chain))]
        for part, piece in zip(chain, pieces, strict=True):
            for state in part.optimizer.state.values():
                state.pop("step", None)  # the loader copies into every state key; the step is not a tensor shard
            part.load_parameter_state_from_fully_reshardable(piece["param_state"])
    else:  # the plain optimizer's own path (same layout only, see checkpoint.reshard_problems)
        optimizer.load_state_dict(loaded)
    _set_step(chain, step)
    for part in chain:
        if scaler is not None and _grad_scaler(part) is not None:
            part.grad_scaler.load_state_dict(scaler)


def _set_step(chain: list, step: int) -> None:
    """torch's Adam: every parameter its own step tensor (Adam increments them in place), and none in the
    groups (megatron's load template copies one there, which Adam never advances); FusedAdam: the groups'."""
    for part in chain:
        inner = part.optimizer
        torch_adam = _torch_adam(inner)
        if torch_adam:
            for state in inner.state.values():
                state["step"] = torch.tensor(float(step))
        for group in inner.param_groups:
            if torch_adam:
                group.pop("step", None)
            elif "step" in group:
                group["step"] = step


def _grad_scaler(part):
    return getattr(part, "grad_scaler", None)  # fp32's optimizer has none at all


def _torch_adam(inner: torch.optim.Optimizer) -> bool:
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))
