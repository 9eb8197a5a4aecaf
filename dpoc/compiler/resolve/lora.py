"""The recipe's `lora` section → the Plan's `Lora` (None without one): targets in megatron-core's names, the
defaults, and the refusals of what the model cannot express (what a target cannot is its `unsupported`).

On a MoE model the MLP linears outside the routed experts are the shared expert's; with `experts: false` and
no shared expert, `linear_fc1`/`linear_fc2` name nothing, so they are refused rather than silently dropped.
"""

from __future__ import annotations

from typing import Any

from dpoc.contract.lora import MCORE_TARGETS, Lora, mcore_targets
from dpoc.contract.plan import ModelSpec

_MLP = ("linear_fc1", "linear_fc2")


def lora_settings(v: Any, model: ModelSpec) -> Lora | None:
    """`v`: the resolver's value reader (take, has, problem). Problems are recorded on it, not raised."""
    if not v.has("lora"):
        v.take("lora", None, why="no lora section: every parameter trains")
        return None
    moe = model.moe
    experts = v.take("lora.experts", False, why="only the dense linears; expert adapters multiply the adapter "
                     "memory by the expert count")
    if experts and moe is None:
        v.problem("lora.experts", f"{model.name} is a dense model (no experts); valid: false, or leave it out")
    mlp_outside_experts = moe is None or moe.shared_expert_ffn_hidden_size > 0
    present = tuple(t for t in MCORE_TARGETS if t not in _MLP or mlp_outside_experts or experts)
    targets = _targets(v, present)
    return Lora(
        rank=v.take("lora.rank"),
        alpha=float(v.take("lora.alpha")),
        dropout=float(v.take("lora.dropout", 0.0, why="no adapter dropout")),
        targets=targets,
        experts=experts,
        init_from=v.take("lora.init_from", None, why="fresh adapters: B at zero, A from PEFT's default init"),
    )


def _targets(v: Any, present: tuple[str, ...]) -> tuple[str, ...]:
    """The chosen targets in megatron-core names; every linear the model has outside what `experts` excludes by
    default."""
    if not v.has("lora.targets"):
        return tuple(v.take("lora.targets", present, rule="model",
                            why="every attention and MLP linear the model has (MLP ones inside routed experts only "
                            "with lora.experts)"))
    given = v.take("lora.targets")
    try:
        chosen = mcore_targets(given)
    except ValueError as exc:
        v.problem("lora.targets", str(exc))
        return present
    absent = [t for t in chosen if t not in present]
    if absent:
        v.problem("lora.targets", f"{absent[0]}: this MoE model has MLP linears only inside its routed experts "
                  "(no shared expert); valid: lora.experts: true, or targets among "
                  f"{', '.join(present)}")
    return chosen
