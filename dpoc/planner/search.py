"""Automatic layout search: enumerate layouts, keep those the compiler's rules accept and that fit in memory,
rank them by predicted throughput.

The search never judges validity itself: `validate(layout)` (the compiler's rules) does, so no rule lives
twice. It only decides which values are worth trying (`SearchSpace`), and pins what the user pinned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import product
from typing import Any

from dpoc.contract.plan import HardwareSpec, Layout, ModelSpec, Training
from dpoc.planner.features import DPOC_CPU, Traits
from dpoc.planner.lengths import Lengths
from dpoc.planner.memory import MemoryEstimate, estimate_memory
from dpoc.planner.throughput import Efficiency, Throughput, predict
from dpoc.planner.workload import DPO_LIVE, Workload

Build = Callable[[dict[str, Any]], Layout]
Validate = Callable[[Layout], Sequence[object]]
SAME_AS_TP = 0  # `etp` value meaning "expert tensor parallel = tp"
FULL_RECOMPUTE = {"recompute": "full", "recompute_method": "uniform", "recompute_num_layers": 1}


@dataclass(frozen=True)
class SearchSpace:
    """Values tried per knob. Selective recompute is left out by default: with flash attention it saves no
    memory in this model and costs time, so it can never win. `uneven` says how a pipeline that does not
    divide the layers is made: an uneven `num_layer_list`, or `noop_layers` padding the layer count up to
    a multiple of pp * vpp with fewer no-ops than stages (MindSpeed's way for Qwen3-235B: 94 + 2)."""

    tp: tuple[int, ...]
    pp: tuple[int, ...]
    vpp: tuple[int, ...] = (1, 2, 4)
    cp: tuple[int, ...] = (1,)
    ep: tuple[int, ...] = (1,)
    etp: tuple[int, ...] = (SAME_AS_TP, 1)
    micro_batch_size: tuple[int, ...] = (1, 2)
    recompute: tuple[str, ...] = ("none", "full")
    uneven: tuple[str, ...] = ("num_layer_list", "noop_layers")


def _divisors(n: int) -> tuple[int, ...]:
    return tuple(d for d in range(1, n + 1) if n % d == 0)


def default_space(model: ModelSpec, hardware: HardwareSpec, training: Training) -> SearchSpace:
    """Powers of two for tp within a node; pp among the world's divisors up to the layer count; cp only when
    each rank still gets >= 4096 tokens of a sequence; ep among the expert count's divisors."""
    world, node = hardware.world_size, hardware.devices_per_node
    tp = tuple(t for t in (1, 2, 4, 8, 16) if t <= node and world % t == 0)
    pp = tuple(p for p in _divisors(world) if p <= model.num_layers)
    cp = tuple(c for c in (1, 2, 4, 8, 16) if c == 1 or training.seq_length // c >= 4096)
    if model.moe is None:
        return SearchSpace(tp=tp, pp=pp, cp=cp, etp=(SAME_AS_TP,))
    ep = tuple(e for e in _divisors(model.moe.num_experts) if world % e == 0)
    return SearchSpace(tp=tp, pp=pp, cp=cp, ep=ep)


def balanced_layer_list(layers: int, pp: int) -> tuple[int, ...]:
    """Layers per stage when pp does not divide them: as even as possible, the first and last stages (which
    also hold the embedding and the output layer) taking the smaller counts."""
    base, extra = divmod(layers, pp)
    order = [*range(1, pp - 1), 0, pp - 1]  # middle stages first
    counts = [base] * pp
    for stage in order[:extra]:
        counts[stage] += 1
    return tuple(counts)


@dataclass(frozen=True)
class Candidate:
    knobs: tuple[tuple[str, Any], ...]
    layout: Layout
    memory: MemoryEstimate | None  # None when a rule rejected the layout
    throughput: Throughput | None  # None unless the layout is valid and fits
    problems: tuple[str, ...]  # rule violations, or the memory overshoot

    @property
    def accepted(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class SearchResult:
    ranked: tuple[Candidate, ...]  # valid and fitting, best predicted throughput first
    too_big: tuple[Candidate, ...]  # the nearest of the valid layouts over memory, smallest need first
    rule_rejected: int
    over_memory: int
    evaluated: int

    @property
    def best(self) -> Candidate | None:
        return self.ranked[0] if self.ranked else None


def _knob_sets(
    model: ModelSpec, world: int, space: SearchSpace, pinned: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """Knob sets to try. Only parallel grids that tile the world (tp*pp*cp and etp*ep*pp dividing it) are
    generated, as any factorising search does; the rules judge everything, including a grid the user
    pinned that does not tile."""
    def values(name: str) -> tuple[Any, ...]:
        return (pinned[name],) if name in pinned else getattr(space, name)

    moe = model.moe is not None
    grid_knobs = ("tp", "pp", "cp", "ep", "etp") if moe else ("tp", "pp", "cp")
    grid_pinned = all(k in pinned for k in grid_knobs)
    experts = list(product(values("ep"), values("etp"))) if moe else [(1, SAME_AS_TP)]
    grid = product(values("tp"), values("pp"), values("cp"), experts, values("micro_batch_size"),
                   values("recompute"))
    for tp, pp, cp, (ep, etp), mbs, recompute in grid:
        etp = tp if etp == SAME_AS_TP else etp
        tiles = world % (tp * pp * cp) == 0 and world % (etp * ep * pp) == 0
        if not tiles and not grid_pinned:
            continue
        knobs: dict[str, Any] = {"tp": tp, "pp": pp, "cp": cp, "micro_batch_size": mbs}
        if moe:
            knobs.update(ep=ep, etp=etp)
        knobs.update(FULL_RECOMPUTE if recompute == "full" else {"recompute": recompute})
        for vpp in values("vpp") if pp > 1 else (1,):
            for layers in _layer_knobs(model.num_layers, pp, vpp, space.uneven, pinned):
                yield {**knobs, "vpp": vpp, **layers, **pinned}


def _layer_knobs(
    layers: int, pp: int, vpp: int, uneven: tuple[str, ...], pinned: dict[str, Any]
) -> list[dict[str, Any]]:
    if layers % pp == 0 or "num_layer_list" in pinned or "noop_layers" in pinned:
        return [{}]
    options = []
    if "num_layer_list" in uneven:
        options.append({"num_layer_list": balanced_layer_list(layers, pp)})
    padded = -(-layers // (pp * vpp)) * pp * vpp
    if "noop_layers" in uneven and padded - layers < pp:  # fewer no-ops than stages, as MindSpeed pads
        options.append({"noop_layers": tuple(range(layers, padded))})
    return options


def search(
    model: ModelSpec, hardware: HardwareSpec, training: Training, build: Build, validate: Validate,
    efficiency: Efficiency, lengths: Lengths, pinned: dict[str, Any] | None = None,
    space: SearchSpace | None = None, keep_too_big: int = 5, workload: Workload = DPO_LIVE,
    traits: Traits = DPOC_CPU,
) -> SearchResult:
    """Every layout of `space` (pinned knobs fixed) that `validate` accepts and that fits, ranked.

    `build(knobs)` is the compiler's knobs -> Layout step; `validate(layout)` its rules (problems, empty when
    valid); `lengths` the sequence lengths (throughput, and memory under dynamic padding); `workload` the live
    or precomputed reference; `traits` how the target batches and which memory features it has.
    """
    pinned = pinned or {}
    space = space or default_space(model, hardware, training)
    ranked, too_big = [], []
    rule_rejected = evaluated = 0
    seen: set[tuple[tuple[str, Any], ...]] = set()
    for knobs in _knob_sets(model, hardware.world_size, space, pinned):
        key = tuple(sorted(knobs.items()))
        if key in seen:
            continue
        seen.add(key)
        evaluated += 1
        layout = build(knobs)
        problems = validate(layout)
        if problems:
            rule_rejected += 1
            continue
        memory = estimate_memory(model, hardware, layout, training, lengths, workload, peak_candidates_only=True,
                                 traits=traits)
        if not memory.fits:
            too_big.append(Candidate(key, layout, memory, None, (memory.need_text(),)))
            continue
        throughput = predict(model, hardware, layout, training, efficiency, lengths, workload, traits)
        ranked.append(Candidate(key, layout, memory, throughput, ()))
    ranked.sort(key=lambda c: (-c.throughput.samples_per_s, c.memory.peak.total))
    too_big.sort(key=lambda c: c.memory.peak.total)
    return SearchResult(tuple(ranked), tuple(too_big[:keep_too_big]), rule_rejected, len(too_big), evaluated)


def smallest_fitting_nodes(
    model: ModelSpec, hardware: HardwareSpec, training: Training,
    prepare: Callable[[HardwareSpec], tuple[Build, Validate]], efficiency: Efficiency, lengths: Lengths,
    pinned: dict[str, Any] | None = None, max_nodes: int = 1024, workload: Workload = DPO_LIVE,
    traits: Traits = DPOC_CPU,
) -> int | None:
    """The fewest nodes (doubling from the hardware's count) on which some valid layout fits, for the
    "does not fit, smallest need is N devices" message; None if even `max_nodes` is not enough.
    `prepare(hardware)` gives the build and validate callables for that cluster size."""
    nodes = hardware.nodes
    while nodes <= max_nodes:
        bigger = replace(hardware, nodes=nodes)
        build, validate = prepare(bigger)
        found = search(model, bigger, training, build, validate, efficiency, lengths, pinned, workload=workload,
                       traits=traits)
        if found.ranked:
            return nodes
        nodes *= 2
    return None
