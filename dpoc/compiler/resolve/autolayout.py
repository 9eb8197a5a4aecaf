"""Choose the parallel layout: the knobs the user pinned, the planner's search for the rest.

Validity is judged only by `dpoc.compiler.resolve.rules` (the same functions whether the user or the search proposes a
layout); fit and speed by the planner's memory and throughput models. A layout that breaks a rule is
reported by the rules; a valid one that does not fit says how many devices the smallest fitting layout needs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from dpoc.compiler.render import targets
from dpoc.compiler.resolve import rules
from dpoc.contract.lora import Lora
from dpoc.contract.plan import DPO, HardwareSpec, Layout, ModelSpec, Training
from dpoc.contract.runs import ROUND_MICRO_BATCHES
from dpoc.planner.features import Traits
from dpoc.planner.layout import make_layout
from dpoc.planner.lengths import Lengths, MeanLength
from dpoc.planner.memory import GIB, MemoryEstimate, estimate_memory, reference_pass_memory
from dpoc.planner.throughput import FITTED, ReferencePass, Throughput, predict, predict_reference_pass
from dpoc.planner.workload import Workload, dpo_workload

if TYPE_CHECKING:
    from dpoc.planner.search import SearchResult

# the knobs the planner chooses when the recipe leaves them open
SEARCHED = ("tp", "pp", "vpp", "cp", "ep", "etp", "micro_batch_size", "recompute")
# the precompute pass's default micro-batch: the largest power of two up to this whose forward fits. Forward
# only keeps nothing for backward, so a larger micro-batch costs one layer's working set and its logits;
# 16 pairs (32 sequences) give every GEMM thousands of rows at any realistic length, past which only the
# logits' memory grows
REFERENCE_MICRO_BATCH_CAP = 16


@dataclass(eq=False, repr=False)  # an intermediate: not frozen, compared by identity, no repr (one method to compile)
class LayoutInputs:
    """Everything the choice of layout depends on, resolved from the recipe."""

    model: ModelSpec
    hardware: HardwareSpec
    training: Training
    dpo: DPO
    runtime: str
    global_batch_size: int
    pinned: dict[str, Any]
    lengths: Lengths
    lora: Lora | None = None
    own_reference: bool = False  # checkpoint.ref_model names the reference

    @property
    def workload(self) -> Workload:
        """The step the planner models. Under LoRA the reference is the policy with its adapters off, except
        where it is another model: `checkpoint.ref_model`, or MindSpeed-LLM's DPO, which builds it as one."""
        return dpo_workload(self.dpo.reference, self.lora, self.own_reference or self.runtime == "mindspeed-rl")

    @property
    def traits(self) -> Traits:
        """How the recipe's target batches and saves memory, as the planner models it."""
        return targets.get(self.runtime).traits(self.hardware)

    def build(self, knobs: dict[str, Any], hardware: HardwareSpec | None = None) -> Layout:
        return make_layout(self.model, hardware or self.hardware, self.global_batch_size, knobs)

    def errors(self, layout: Layout, hardware: HardwareSpec | None = None) -> list[rules.Violation]:
        context = rules.Context(self.model, hardware or self.hardware, layout, self.training, self.dpo)
        return [v for v in rules.check(context) if not v.warning]


@dataclass(eq=False, repr=False)  # an intermediate: not frozen, compared by identity, no repr (one method to compile)
class ReferencePlan:
    """The precompute pass of `dpo.reference: precomputed` at the training layout."""

    estimate: ReferencePass
    memory: MemoryEstimate
    chosen: bool  # the planner picked the micro-batch (else the recipe)


@dataclass(eq=False, repr=False)  # a result: not frozen, compared by identity, no repr (one method to compile)
class Choice:
    """A layout the planner considered, with its predicted memory and throughput."""
    layout: Layout
    memory: MemoryEstimate
    throughput: Throughput
    chosen: tuple[str, ...]  # knobs the planner set
    result: SearchResult | None  # None when the recipe pinned every searched knob
    warnings: tuple[rules.Violation, ...] = ()
    reference_pass: ReferencePlan | None = None  # precomputed reference only
    full_parameter: tuple[MemoryEstimate, Throughput] | None = None  # LoRA only: the same layout training everything


class LayoutError(Exception):
    def __init__(self, violations: list[rules.Violation]):
        self.violations = violations


def open_knobs(model: ModelSpec, pinned: dict[str, Any]) -> list[str]:
    expert = ("ep", "etp")
    return [k for k in SEARCHED if k not in pinned and (model.moe is not None or k not in expert)]


def search_layouts(i: LayoutInputs, hardware: HardwareSpec | None = None, workload: Workload | None = None
                   ) -> SearchResult:
    """Every layout the target can express, with the pinned knobs fixed, that passes the rules; ranked (for the
    recipe's reference mode unless `workload` says another)."""
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
        i.lengths,
        i.pinned,
        space,
        workload=workload or i.workload,
        traits=i.traits,
    )


def choose(i: LayoutInputs) -> Choice:
    if not open_knobs(i.model, i.pinned):
        layout = i.build(i.pinned)
        errors = i.errors(layout)
        if errors:
            raise LayoutError(errors)
        memory = estimate_memory(i.model, i.hardware, layout, i.training, i.lengths, i.workload, traits=i.traits)
        hint = "valid: unpin knobs and let the planner choose, or see `dpoc plan` for layouts that fit"
        if max(s.static + s.reserve for s in memory.stages) > memory.capacity:
            raise LayoutError([_does_not_fit(memory, i.hardware, hint)])
        warnings = () if memory.fits else (_activations_do_not_fit(memory, i.lengths),)
        throughput = predict(i.model, i.hardware, layout, i.training, FITTED, i.lengths, i.workload, i.traits)
        reference = reference_plan(i, layout)
        warnings += _reference_warnings(reference)
        return Choice(layout, memory, throughput, (), None, warnings, reference, full_parameter(i, layout))

    result = search_layouts(i)
    if result.best is None:
        raise LayoutError(explain_failure(i, result))
    best = result.best
    memory = estimate_memory(i.model, i.hardware, best.layout, i.training, i.lengths, i.workload, traits=i.traits)
    chosen = tuple(k for k, _ in best.knobs if k not in i.pinned)
    reference = reference_plan(i, best.layout)
    return Choice(best.layout, memory, best.throughput, chosen, result, _reference_warnings(reference), reference,
                  full_parameter(i, best.layout))


def full_parameter(i: LayoutInputs, layout: Layout) -> tuple[MemoryEstimate, Throughput] | None:
    """Under LoRA, the alternative beside it: `layout` training every parameter (None without LoRA)."""
    if i.lora is None:
        return None
    full = replace(i, lora=None).workload
    return (estimate_memory(i.model, i.hardware, layout, i.training, i.lengths, full, traits=i.traits),
            predict(i.model, i.hardware, layout, i.training, FITTED, i.lengths, full, i.traits))


def reference_plan(i: LayoutInputs, layout: Layout) -> ReferencePlan | None:
    """The precompute pass (precomputed reference only): the recipe's micro-batch, else the largest power of
    two up to REFERENCE_MICRO_BATCH_CAP whose forward fits at `layout` (1 when none does: a warning says so)."""
    if i.dpo.reference != "precomputed":
        return None
    pinned = i.dpo.reference_micro_batch_size
    candidates = [pinned] if pinned else [1 << k for k in range(REFERENCE_MICRO_BATCH_CAP.bit_length() - 1, -1, -1)]
    for micro_batch in candidates:
        memory = reference_pass_memory(i.model, i.hardware, layout, i.training, i.lengths, micro_batch, i.traits)
        if memory.fits or micro_batch == candidates[-1]:
            break
    estimate = predict_reference_pass(i.model, i.hardware, layout, i.training, FITTED, i.lengths, micro_batch,
                                      ROUND_MICRO_BATCHES)
    return ReferencePlan(estimate, memory, chosen=not pinned)


def _reference_warnings(reference: ReferencePlan | None) -> tuple[rules.Violation, ...]:
    if reference is None or reference.memory.fits:
        return ()
    peak = reference.memory.peak
    return (rules.Violation(
        "dpo.reference_micro_batch_size",
        f"does not fit: the precompute pass at {reference.estimate.micro_batch_size} pairs per forward needs up to "
        f"{peak.total / GIB:.1f} GiB on pipeline stage {peak.stage} of {reference.memory.capacity / GIB:g} GiB "
        "(valid: a smaller dpo.reference_micro_batch_size)", warning=True),)


def explain_failure(i: LayoutInputs, result: SearchResult) -> list[rules.Violation]:
    """Why no layout was found: too little memory (and how much would do), or the pinned knobs break a rule."""
    from dpoc.planner.search import smallest_fitting_nodes

    if result.too_big:

        def prepare(hw: HardwareSpec):
            return (lambda k: i.build(k, hw)), (lambda lay: i.errors(lay, hw))

        nodes = smallest_fitting_nodes(i.model, i.hardware, i.training, prepare, FITTED, i.lengths, i.pinned,
                                       workload=i.workload, traits=i.traits)
        need = (
            f"smallest need is {nodes * i.hardware.devices_per_node} devices ({nodes} nodes)"
            if nodes
            else "no layout fits on up to 1024 nodes"
        )
        return [_does_not_fit(result.too_big[0].memory, i.hardware, need)]
    return i.errors(i.build(i.pinned)) or [
        rules.Violation("parallelism", f"no layout satisfies every rule with the pinned knobs {i.pinned}; unpin some")
    ]


def _activations_do_not_fit(memory: MemoryEstimate, lengths: Lengths) -> rules.Violation:
    """Weights, gradients, optimizer and reference fit; with activations and buffers (an upper bound) the peak
    does not: a warning, in the words `dpoc plan` labels every layout with."""
    peak = memory.peak
    hint = ("set training.length_stats to the dataset's _stats.json (preprocess.sh writes it) so that the plan "
            "follows the real lengths, or add recompute") if isinstance(lengths, MeanLength) else "add recompute"
    return rules.Violation(
        "parallelism",
        f"does not fit: pipeline stage {peak.stage} needs up to {peak.total / GIB:.1f} GiB per device "
        f"of {memory.capacity / GIB:g} GiB ({peak.static / GIB:.1f} GiB static, the rest activations and buffers "
        f"with {lengths.text()}; it builds, as the static part fits and the activations are an upper bound; "
        f"{hint})",
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
