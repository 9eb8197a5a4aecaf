"""`dpoc plan RECIPE`: the ranked layouts with their memory breakdown and predicted speed, and why."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from dpoc.compiler.pipeline import load_and_check
from dpoc.compiler.render.targets import TARGETS
from dpoc.compiler.resolve.autolayout import (
    SEARCHED,
    Choice,
    LayoutError,
    choose,
    explain_failure,
    reference_plan,
    search_layouts,
)
from dpoc.compiler.resolve.resolver import layout_inputs
from dpoc.contract.errors import Problem
from dpoc.contract.plan import Layout
from dpoc.planner.memory import GIB, estimate_memory
from dpoc.planner.report import (
    knob_text,
    memory_summary,
    packing_summary,
    reference_pass_summary,
    shares_text,
    throughput_summary,
    traits_summary,
)
from dpoc.planner.search import Candidate, SearchResult
from dpoc.planner.throughput import FITTED


def plan_command(recipe: str, overrides: Sequence[str], as_json: bool, top: int, chart: str | None) -> int:
    """Rank every layout the recipe's target can run (pins lifted), and show where the recipe's own stands.

    A what-if answer, not a build: the host list plays no part, and a recipe whose own layout is invalid for
    the model or size asked about (or a size where nothing fits) still gets the ranking, with the reasons.
    Exit 0 whenever the recipe itself is valid input."""
    loaded = load_and_check(recipe, overrides)
    inputs = layout_inputs(loaded)
    open_inputs = replace(inputs, pinned={})
    result = search_layouts(open_inputs)
    try:
        own: Choice | None = choose(inputs)
        invalid: list[Problem] = []
    except LayoutError as exc:
        own, invalid = None, _problems(loaded.path, exc.violations)
    no_fit = _problems(loaded.path, explain_failure(open_inputs, result)) if result.best is None else []
    if as_json:
        print(json.dumps(_as_data(inputs, result, own, invalid, no_fit, top), indent=2, sort_keys=True))
    else:
        _print_table(recipe, inputs, result, top, own, invalid, no_fit)
    if chart:
        from dpoc.cli.plan_chart import memory_svg

        layout = own.layout if own else result.best.layout if result.best else None
        if layout is not None:
            memory = estimate_memory(inputs.model, inputs.hardware, layout, inputs.training, inputs.lengths,
                                     inputs.workload, traits=inputs.traits)
            Path(chart).write_text(memory_svg(memory, f"{loaded.name}: {knob_text(_knobs(layout))}"))
    for warning in own.warnings if own else ():
        print(f"{loaded.path}: warning: {warning.field}: {warning.message}", file=sys.stderr)
    return 0


def _problems(file: str, violations) -> list[Problem]:
    return list(dict.fromkeys(Problem(file, v.field, v.message) for v in violations))


def _knobs(layout: Layout) -> dict[str, Any]:
    return {k: getattr(layout, k) for k in SEARCHED}


def _rank(result: SearchResult, own: Choice) -> int:
    """1 + how many fitting layouts are predicted faster than the recipe's own (where its speed would place it;
    it ranks among them only when it fits by the same threshold)."""
    return 1 + sum(c.throughput.samples_per_s > own.throughput.samples_per_s * (1 + 1e-9) for c in result.ranked)


def _candidate_data(c: Candidate) -> dict[str, Any]:
    knobs = {k: list(v) if isinstance(v, tuple) else v for k, v in c.knobs}
    data: dict[str, Any] = {"knobs": knobs, "memory": memory_summary(c.memory) if c.memory else None}
    if c.throughput is not None:
        data["throughput"] = throughput_summary(c.throughput)
    if c.problems:
        data["problems"] = list(c.problems)
    return data


def _as_data(inputs, result: SearchResult, own: Choice | None, invalid: list[Problem], no_fit: list[Problem],
             top: int) -> dict[str, Any]:
    recipe: dict[str, Any] = {"valid": own is not None, "problems": [str(p) for p in invalid]}
    if own is not None:
        recipe.update(knobs=_knobs(own.layout), rank=_rank(result, own) if own.memory.fits else None,
                      memory=memory_summary(own.memory),
                      throughput=throughput_summary(own.throughput),
                      warnings=[f"{w.field}: {w.message}" for w in own.warnings])
        if inputs.training.packing:
            recipe["packing"] = packing_summary(own.layout, inputs.training, inputs.lengths)
    return {
        "recipe_layout": recipe,
        "pinned": {k: list(v) if isinstance(v, tuple | list) else v for k, v in inputs.pinned.items()},
        "lengths": inputs.lengths.summary(),
        "reference": inputs.dpo.reference,
        "reference_modes": _modes_data(inputs),
        "targets": _targets_data(inputs),
        "efficiency": {"dense": FITTED.dense, "experts": FITTED.experts},
        "evaluated": result.evaluated, "rule_rejected": result.rule_rejected, "over_memory": result.over_memory,
        "ranked": [_candidate_data(c) for c in result.ranked[:top]],
        "nearest_over_memory": [_candidate_data(c) for c in result.too_big],
        "no_fit": [str(p) for p in no_fit],
        "full_parameter": _full_parameter_data(inputs) if inputs.lora is not None else None,
    }


def _full_parameter_data(inputs) -> dict[str, Any]:
    best, no_fit = _full_parameter(inputs)
    return {"best": _candidate_data(best) if best is not None else None, "no_fit": no_fit}


def _print_table(recipe: str, inputs, result: SearchResult, top: int, own: Choice | None,
                 invalid: list[Problem], no_fit: list[Problem]) -> None:
    from rich.console import Console
    from rich.table import Table

    hw = inputs.hardware
    console = Console(file=sys.stdout, width=160)
    table = Table(title=f"{recipe}: {inputs.model.name} on {hw.nodes} × {hw.devices_per_node} {hw.name} "
                        f"({hw.memory_gib:g} GiB per device), {inputs.lengths.text()}"
                        f"{', packed' if inputs.training.packing else ''}, {inputs.dpo.reference} reference")
    for name in ("#", "layout", "pairs/s", "tokens/s", "MFU", "DPO-MFU", "peak GiB", "stage", "w+g+opt", "ref",
                 "activ.", "other"):
        table.add_column(name, justify="left" if name == "layout" else "right")
    for rank, c in enumerate(result.ranked[:top], 1):
        table.add_row(str(rank), knob_text(dict(c.knobs)), *_numbers(c))
    for c in result.too_big:
        table.add_row("✗", knob_text(dict(c.knobs)), "", "", "", "", *_numbers(c)[4:], style="dim")
    console.print(table)
    console.print(f"{result.evaluated} layouts tried: {result.rule_rejected} break a rule, {result.over_memory} do "
                  f"not fit, {len(result.ranked)} fit. Efficiency {FITTED.dense} dense / {FITTED.experts} experts "
                  f"(fitted on published non-DPO runs; see bench/planner.py); {hw.op_latency_us:g} µs per kernel call "
                  f"({hw.name} preset).")
    if result.best is not None:
        best = result.best.throughput
        line = f"Best: {knob_text(dict(result.best.knobs))} — {best.samples_per_s:.2f} pairs/s predicted"
        if len(result.ranked) > 1:
            second = result.ranked[1].throughput
            line += f", {best.samples_per_s / second.samples_per_s - 1:.1%} ahead of #2"
        console.print(f"{line}; {shares_text(best)}")
    for c in result.too_big[:3]:
        console.print(f"Does not fit: {knob_text(dict(c.knobs))} — {'; '.join(c.problems)}")
    if own is not None:
        t, fitting = own.throughput, len(result.ranked)
        where = (f", rank {_rank(result, own)} of the {fitting} that fit; {own.memory.need_text()}"
                 if own.memory.fits else f"; does not fit: {own.memory.need_text()}, so it is not among the "
                 f"{fitting} that fit (it would rank {_rank(result, own)}); it builds with a warning (below)")
        console.print(f"Recipe's layout: {knob_text(_knobs(own.layout))} — {t.samples_per_s:.2f} pairs/s "
                      f"predicted{where}; {shares_text(t)}")
        if inputs.training.packing:
            p = packing_summary(own.layout, inputs.training, inputs.lengths)
            console.print(f"Packing: {p['micro_batches']} micro-batches per rank and step of up to "
                          f"{p['budget_tokens']} tokens, {p['pairs_per_micro_batch']:g} pairs each, "
                          f"fill {p['fill']:.0%}")
    else:
        console.print("Recipe's layout is invalid:")
        for problem in invalid:
            console.print(f"  {problem}", highlight=False, markup=False, soft_wrap=True)
    for problem in no_fit:
        console.print(f"No layout fits: {problem}", highlight=False, markup=False, soft_wrap=True)
    for line in [*_lora_lines(inputs, result), *_targets_lines(inputs)]:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    for mode, best in _mode_bests(inputs).items():
        if best is None:
            console.print(f"Reference {mode}: no layout fits")
            continue
        line = (f"Reference {mode}: best {knob_text(dict(best.knobs))} — {best.throughput.samples_per_s:.2f} pairs/s, "
                f"peak {best.memory.peak.total / GIB:.1f} GiB")
        if mode == "precomputed":
            ref = reference_plan(replace(inputs, dpo=replace(inputs.dpo, reference=mode)), best.layout)
            line += (f"; precompute pass {ref.estimate.pairs_per_s:.2f} pairs/s at micro-batch "
                     f"{ref.estimate.micro_batch_size}"
                     + (f", {ref.estimate.seconds:.0f} s over the dataset" if ref.estimate.seconds is not None else ""))
        console.print(line)


def _full_parameter(inputs) -> tuple[Candidate | None, list[str]]:
    """LoRA's alternative: the best layout training every parameter (pins lifted), or why none fits."""
    full = replace(inputs, pinned={}, lora=None)
    result = search_layouts(full)
    if result.best is not None:
        return result.best, []
    return None, [v.message for v in explain_failure(full, result)]


def _lora_lines(inputs, result: SearchResult) -> list[str]:
    """Under LoRA: what the best layout's peak stage holds for it, and the full-parameter alternative."""
    lora = inputs.lora
    if lora is None:
        return []
    lines = []
    if result.best is not None:
        peak = result.best.memory.peak
        lines.append(f"LoRA rank {lora.rank} on {', '.join(lora.targets)}{' and the experts' if lora.experts else ''}: "
                     f"stage {peak.stage} holds the frozen base and adapters in {peak.weights / GIB:.1f} GiB, the "
                     f"adapters' gradients and optimizer state in {(peak.gradients + peak.optimizer) / GIB:.2f} GiB, "
                     f"reference copy {peak.reference / GIB:.1f} GiB")
    best, no_fit = _full_parameter(inputs)
    if best is None:
        lines += [f"Full-parameter alternative: {line}" for line in no_fit]
    else:
        lines.append(f"Full-parameter alternative: best {knob_text(dict(best.knobs))} — "
                     f"{best.throughput.samples_per_s:.2f} pairs/s, peak {best.memory.peak.total / GIB:.1f} GiB")
    return lines


def _target_choices(inputs) -> dict[str, Choice | str]:
    """The recipe's own layout under each target's batching and memory features (`traits`): the same job's
    predicted pairs/s and peak; the reason where the layout rules refuse it (what else a target cannot
    express, `dpoc build` says)."""
    out: dict[str, Choice | str] = {}
    for name in TARGETS:
        try:
            out[name] = choose(replace(inputs, runtime=name))
        except LayoutError as exc:
            out[name] = "; ".join(v.message for v in exc.violations)
    return out


def _targets_data(inputs) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, choice in _target_choices(inputs).items():
        if isinstance(choice, str):
            out[name] = {"problem": choice}
            continue
        out[name] = {"target": traits_summary(replace(inputs, runtime=name).traits),
                     "knobs": _knobs(choice.layout), "memory": memory_summary(choice.memory),
                     "throughput": throughput_summary(choice.throughput)}
    return out


def _targets_lines(inputs) -> list[str]:
    lines = []
    for name, choice in _target_choices(inputs).items():
        if isinstance(choice, str):
            lines.append(f"Target {name}: {choice}")
            continue
        batching = replace(inputs, runtime=name).traits.batching
        lines.append(f"Target {name} ({batching} batching): {knob_text(_knobs(choice.layout))} — "
                     f"{choice.throughput.samples_per_s:.2f} pairs/s, {choice.memory.need_text()}")
    return lines


def _mode_bests(inputs) -> dict[str, Candidate | None]:
    """Each reference mode's best layout (pins lifted): precomputed holds no reference and runs no reference
    forward in the step, so it may fit a smaller tp/pp or a larger micro-batch."""
    return {mode: search_layouts(replace(inputs, pinned={}, dpo=replace(inputs.dpo, reference=mode))).best
            for mode in ("live", "precomputed")}


def _modes_data(inputs) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, best in _mode_bests(inputs).items():
        data = _candidate_data(best) if best is not None else None
        if best is not None and mode == "precomputed":
            ref = reference_plan(replace(inputs, dpo=replace(inputs.dpo, reference=mode)), best.layout)
            data["reference_pass"] = reference_pass_summary(ref.estimate, ref.memory)
        out[mode] = data
    return out


def _numbers(c: Candidate) -> list[str]:
    peak = c.memory.peak
    t = c.throughput
    speed = [f"{t.samples_per_s:.2f}", f"{t.tokens_per_s:,.0f}", f"{t.mfu:.1%}", f"{t.dpo_mfu:.1%}"] if t else [""] * 4
    other = peak.pipeline_buffers + peak.logits + peak.transient + peak.comm_buffers + peak.reserve
    return [*speed, f"{peak.total / GIB:.1f}", str(peak.stage),
            f"{(peak.weights + peak.gradients + peak.optimizer) / GIB:.1f}", f"{peak.reference / GIB:.1f}",
            f"{peak.activations / GIB:.1f}", f"{other / GIB:.1f}"]
