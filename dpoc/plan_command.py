"""`dpoc plan RECIPE`: the ranked layouts with their memory breakdown and predicted speed, and why."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpoc.autolayout import LayoutError, choose, search_layouts
from dpoc.compile import load_and_check
from dpoc.errors import DpocError, Problem
from dpoc.planner.memory import GIB, estimate_memory
from dpoc.planner.report import knob_text, memory_summary, throughput_summary
from dpoc.planner.search import Candidate, SearchResult
from dpoc.planner.throughput import FITTED
from dpoc.resolve import layout_inputs


def plan_command(recipe: str, overrides: Sequence[str], as_json: bool, top: int, chart: str | None) -> int:
    loaded = load_and_check(recipe, overrides)
    inputs = layout_inputs(loaded)
    result = search_layouts(inputs)
    if as_json:
        print(json.dumps(_as_data(inputs, result, top), indent=2, sort_keys=True))
    else:
        _print_table(recipe, inputs, result, top)
    shown = result.best or (result.too_big[0] if result.too_big else None)
    if chart and shown is not None:
        from dpoc.plan_chart import memory_svg

        memory = estimate_memory(inputs.model, inputs.hardware, shown.layout, inputs.training,
                                 inputs.mean_seq_length)
        Path(chart).write_text(memory_svg(memory, f"{loaded.name}: {knob_text(dict(shown.knobs))}"))
    if result.best is None:
        try:  # a fully pinned layout whose weights fit is built with a warning, not refused: say the same here
            choice = choose(inputs)
        except LayoutError as exc:
            raise DpocError([Problem(loaded.path, v.field, v.message) for v in exc.violations]) from None
        for warning in choice.warnings:
            print(f"{loaded.path}: warning: {warning.field}: {warning.message}", file=sys.stderr)
    return 0


def _candidate_data(c: Candidate) -> dict[str, Any]:
    knobs = {k: list(v) if isinstance(v, tuple) else v for k, v in c.knobs}
    data: dict[str, Any] = {"knobs": knobs, "memory": memory_summary(c.memory) if c.memory else None}
    if c.throughput is not None:
        data["throughput"] = throughput_summary(c.throughput)
    if c.problems:
        data["problems"] = list(c.problems)
    return data


def _as_data(inputs, result: SearchResult, top: int) -> dict[str, Any]:
    return {
        "pinned": {k: list(v) if isinstance(v, tuple | list) else v for k, v in inputs.pinned.items()},
        "mean_seq_length": inputs.mean_seq_length,
        "efficiency": {"dense": FITTED.dense, "experts": FITTED.experts},
        "evaluated": result.evaluated, "rule_rejected": result.rule_rejected, "over_memory": result.over_memory,
        "ranked": [_candidate_data(c) for c in result.ranked[:top]],
        "nearest_over_memory": [_candidate_data(c) for c in result.too_big],
    }


def _print_table(recipe: str, inputs, result: SearchResult, top: int) -> None:
    from rich.console import Console
    from rich.table import Table

    hw = inputs.hardware
    console = Console(file=sys.stdout, width=160)
    table = Table(title=f"{recipe}: {inputs.model.name} on {hw.nodes} × {hw.devices_per_node} {hw.name} "
                        f"({hw.memory_gib:g} GiB per device), mean {inputs.mean_seq_length:g} tokens/sequence")
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
                  "(fitted on published non-DPO runs; see bench/planner.py).")
    if result.best is not None:
        best = result.best.throughput
        line = f"Chosen: {knob_text(dict(result.best.knobs))} — {best.samples_per_s:.2f} pairs/s predicted"
        if len(result.ranked) > 1:
            second = result.ranked[1].throughput
            line += f", {best.samples_per_s / second.samples_per_s - 1:.1%} ahead of #2"
        console.print(line)
    for c in result.too_big[:3]:
        console.print(f"Rejected: {knob_text(dict(c.knobs))} — {'; '.join(c.problems)}")


def _numbers(c: Candidate) -> list[str]:
    peak = c.memory.peak
    t = c.throughput
    speed = [f"{t.samples_per_s:.2f}", f"{t.tokens_per_s:,.0f}", f"{t.mfu:.1%}", f"{t.dpo_mfu:.1%}"] if t else [""] * 4
    other = peak.pipeline_buffers + peak.logits + peak.transient + peak.comm_buffers + peak.reserve
    return [*speed, f"{peak.total / GIB:.1f}", str(peak.stage),
            f"{(peak.weights + peak.gradients + peak.optimizer) / GIB:.1f}", f"{peak.reference / GIB:.1f}",
            f"{peak.activations / GIB:.1f}", f"{other / GIB:.1f}"]
