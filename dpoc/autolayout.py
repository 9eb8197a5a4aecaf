"""Choose the parallel layout: the knobs the user pinned, the planner's search for the rest.

Validity is judged only by `dpoc.rules` (the same functions whether the user or the search proposes a
layout); fit and speed by the planner's memory and throughput models. A layout that breaks a rule is
reported by the rules; a valid one that does not fit says how many devices the smallest fitting layout needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dpoc import rules, targets
from dpoc.layout import make_layout
from dpoc.plan import DPO, HardwareSpec, Layout, ModelSpec, Training
from dpoc.planner.memory import GIB, MemoryEstimate, estimate_memory
from dpoc.planner.throughput import FITTED, Throughput, predict

if TYPE_CHECKING:
    from dpoc.planner.search import SearchResult

# the knobs the planner chooses when the recipe leaves them open
SEARCHED = ("tp", "pp", "vpp", "cp", "ep", "etp", "micro_batch_size", "recompute")


@dataclass(frozen=True)
class LayoutInputs:
    """Everything the choice of layout depends on, resolved from the recipe."""

    model: ModelSpec
    hardware: HardwareSpec
    training: Training
    dpo: DPO
    runtime: str
    global_batch_size: int
    pinned: dict[str, Any]
    mean_seq_length: float

    def build(self, knobs: dict[str, Any], hardware: HardwareSpec | None = None) -> Layout:
        return make_layout(self.model, hardware or self.hardware, self.global_batch_size, knobs)

    def errors(self, layout: Layout, hardware: HardwareSpec | None = None) -> list[rules.Violation]:
        context = rules.Context(self.model, hardware or self.hardware, layout, self.training, self.dpo)
        return [v for v in rules.check(context) if not v.warning]


@dataclass(frozen=True)
class Choice:
    layout: Layout
    memory: MemoryEstimate
    throughput: Throughput
    chosen: tuple[str, ...]  # knobs the planner set
    result: SearchResult | None  # None when the recipe pinned every searched knob
    warnings: tuple[rules.Violation, ...] = ()


class LayoutError(Exception):
    def __init__(self, violations: list[rules.Violation]):
        self.violations = violations


def open_knobs(model: ModelSpec, pinned: dict[str, Any]) -> list[str]:
    expert = ("ep", "etp")
    return [k for k in SEARCHED if k not in pinned and (model.moe is not None or k not in expert)]


def search_layouts(i: LayoutInputs, hardware: HardwareSpec | None = None) -> SearchResult:
    """Every layout the target can express, with the pinned knobs fixed, that passes the rules; ranked."""
    from dpoc.planner.search import default_space, search

    hw = hardware or i.hardware
    space = targets.get(i.runtime).restrict_search(default_space(i.model, hw, i.training))
    return search(
        i.model,
        hw,
        i.training,
        lambda k: i.build(k, hw),
        lambda lay: i.errors(lay, hw),
        FITTED,
        i.mean_seq_length,
        i.pinned,
        space,
    )


def choose(i: LayoutInputs) -> Choice:
    if not open_knobs(i.model, i.pinned):
        layout = i.build(i.pinned)
        errors = i.errors(layout)
        if errors:
            raise LayoutError(errors)
        memory = estimate_memory(i.model, i.hardware, layout, i.training, i.mean_seq_length)
        hint = "valid: unpin knobs and let the planner choose, or see `dpoc plan` for layouts that fit"
        if max(s.static + s.reserve for s in memory.stages) > memory.capacity:
            raise LayoutError([_does_not_fit(memory, i.hardware, hint)])
        warnings = () if memory.fits else (_may_not_fit(memory, i.mean_seq_length),)
        throughput = predict(i.model, i.hardware, layout, i.training, FITTED, i.mean_seq_length)
        return Choice(layout, memory, throughput, (), None, warnings)

    result = search_layouts(i)
    if result.best is None:
        raise LayoutError(explain_failure(i, result))
    best = result.best
    memory = estimate_memory(i.model, i.hardware, best.layout, i.training, i.mean_seq_length)
    chosen = tuple(k for k, _ in best.knobs if k not in i.pinned)
    return Choice(best.layout, memory, best.throughput, chosen, result)


def explain_failure(i: LayoutInputs, result: SearchResult) -> list[rules.Violation]:
    """Why no layout was found: too little memory (and how much would do), or the pinned knobs break a rule."""
    from dpoc.planner.search import smallest_fitting_nodes

    if result.too_big:

        def prepare(hw: HardwareSpec):
            return (lambda k: i.build(k, hw)), (lambda lay: i.errors(lay, hw))

        nodes = smallest_fitting_nodes(i.model, i.hardware, i.training, prepare, FITTED, i.mean_seq_length, i.pinned)
        need = (
            f"smallest need is {nodes * i.hardware.devices_per_node} devices ({nodes} nodes)"
            if nodes
            else "no layout fits on up to 1024 nodes"
        )
        return [_does_not_fit(result.too_big[0].memory, i.hardware, need)]
    return i.errors(i.build(i.pinned)) or [
        rules.Violation("parallelism", f"no layout satisfies every rule with the pinned knobs {i.pinned}; unpin some")
    ]


def _may_not_fit(memory: MemoryEstimate, mean_seq_length: float) -> rules.Violation:
    """Weights, gradients, optimizer and reference fit; activations and buffers (an upper bound) may not."""
    peak = memory.peak
    return rules.Violation(
        "parallelism",
        f"may not fit: pipeline stage {peak.stage} needs up to {peak.total / GIB:.1f} GiB per device "
        f"of {memory.capacity / GIB:g} GiB ({peak.static / GIB:.1f} GiB static, the rest activations and buffers "
        f"at a mean of {mean_seq_length:g} tokens per sequence; set training.mean_seq_length from the "
        "preprocessing stats, or add recompute)",
        warning=True,
    )


def _does_not_fit(memory: MemoryEstimate, hardware: HardwareSpec, need: str) -> rules.Violation:
    peak = memory.peak
    return rules.Violation(
        "hardware.nodes",
        f"does not fit: pipeline stage {peak.stage} needs {peak.total / GIB:.1f} GiB per device "
        f"(incl. {peak.reserve / GIB:.1f} GiB reserve) of {memory.capacity / GIB:g} GiB on {hardware.nodes} × "
        f"{hardware.devices_per_node} {hardware.name}; {need}",
    )
