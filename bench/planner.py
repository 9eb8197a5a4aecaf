"""Planner benchmark: calibration on published non-DPO throughput, held-out DPO error, search time.

    python bench/planner.py [--smoke] [--out FILE]   # prints tables, writes bench/results/planner.json
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._shared import arguments, write_result
from dpoc import rules
from dpoc.layout import make_layout
from dpoc.plan import DPO, HardwareSpec, Layout, ModelSpec, Training
from dpoc.planner.calibration import (
    ORCA_DPO_MEAN_PADDED_TOKENS,
    calibration_set,
    dpo_held_out,
    fit,
    implied_mean_length,
    predicted,
    training,
)
from dpoc.planner.memory import estimate_memory
from dpoc.planner.report import explain
from dpoc.planner.search import search
from dpoc.planner.throughput import Efficiency
from dpoc.specs import preset_hardware, preset_model


def calibration_report() -> dict[str, Any]:
    result = fit()
    eff = result.efficiency
    singles = dict(result.per_case)
    rows = []
    print("Calibration set (published non-DPO throughput):")
    print(f"  {'case':<40} {'measured':>10} {'predicted':>10} {'error':>7}  own-fit eff  unit / assumed")
    for case in calibration_set():
        p = predicted(case, eff)
        err = p / case.measured - 1
        own = singles.get(case.label)
        rows.append({"case": case.label, "unit": case.unit, "measured": case.measured, "predicted": p,
                     "error": err, "own_fit_dense_efficiency": own, "source": case.source,
                     "assumed": case.assumed})
        own_txt = f"{own:.3f}" if own is not None else "  -  "
        print(f"  {case.label:<40} {case.measured:>10.1f} {p:>10.1f} {err:>+7.1%}  {own_txt:>11}  "
              f"{case.unit}; {case.assumed}")
    print(f"Fitted efficiency: dense {eff.dense:.3f}, routed experts {eff.experts:.3f}")
    held = []
    print(f"Held-out DPO (mean padded length assumed {ORCA_DPO_MEAN_PADDED_TOKENS:.0f} tokens):")
    for case in dpo_held_out():
        p = predicted(case, eff)
        err = p / case.measured - 1
        implied = implied_mean_length(case, eff)
        padded = predicted(case, eff, float(case.seq_length))
        layout = make_layout(case.model, case.hardware, case.global_batch_size, case.knobs)
        dynamic = replace(training(case.seq_length), dynamic_padding=True)
        peak = estimate_memory(case.model, case.hardware, layout, dynamic, ORCA_DPO_MEAN_PADDED_TOKENS).peak
        full = estimate_memory(case.model, case.hardware, layout, training(case.seq_length)).peak
        by_length = {n: predicted(case, eff, float(n)) for n in (250, 500, 1000, 2000, 4096)}
        held.append({"case": case.label, "unit": case.unit, "measured": case.measured, "predicted": p,
                     "predicted_by_mean_padded_tokens": by_length,
                     "error": err, "implied_mean_padded_tokens": implied,
                     "predicted_if_padded_to_seq_length": padded,
                     "error_if_padded_to_seq_length": padded / case.measured - 1,
                     "peak_memory_gib_dynamic": peak.total / 2**30,
                     "peak_memory_gib_padded": full.total / 2**30,
                     "source": case.source, "assumed": case.assumed})
        implied_text = f">= {case.seq_length}" if implied >= case.seq_length else f"{implied:.0f}"
        print(f"  {case.label:<40} {case.measured:>6.2f} pairs/s  predicted {p:>6.2f}  error {err:>+7.1%}")
        print(f"    padded to {case.seq_length}: {padded:.2f} ({padded / case.measured - 1:+.1%}); the model "
              f"matches at a mean padded length of {implied_text} tokens; peak memory "
              f"{peak.total / 2**30:.1f} GiB (dynamic), {full.total / 2**30:.1f} GiB (all padded)")
        print("    pairs/s by mean padded length: "
              + ", ".join(f"{n}: {v:.2f}" for n, v in by_length.items()))
    return {"calibration": rows, "efficiency": {"dense": eff.dense, "experts": eff.experts},
            "held_out_dpo": held, "orca_mean_padded_tokens_assumed": ORCA_DPO_MEAN_PADDED_TOKENS}


DPO_LOSS = DPO(loss="sigmoid", beta=0.1, label_smoothing=0.0, sft_weight=0.0)


def compiler_rules(model: ModelSpec, hardware: HardwareSpec, train: Training) -> Callable[[Layout], list[str]]:
    """`dpoc.rules` as the compiler applies them: a violation that is not a warning rejects the layout."""
    def validate(layout: Layout) -> list[str]:
        context = rules.Context(model, hardware, layout, train, DPO_LOSS)
        return [f"{v.field}: {v.message}" for v in rules.check(context) if not v.warning]
    return validate


SEARCHES = (
    ("Qwen3-30B-A3B DPO on A2 2x8", preset_model("qwen3-30b-a3b"), preset_hardware("atlas-a2", 2), 64),
    ("Qwen3-30B-A3B DPO on A3 2x16", preset_model("qwen3-30b-a3b"), preset_hardware("atlas-a3", 2), 64),
    ("Qwen3-235B-A22B DPO on A3 64x16", preset_model("qwen3-235b-a22b"), preset_hardware("atlas-a3", 64), 1024),
)


def search_report(efficiency: Efficiency, searches=SEARCHES, repeats: int = 5) -> list[dict[str, Any]]:
    rows = []
    mean = ORCA_DPO_MEAN_PADDED_TOKENS
    print(f"Search (seq 4096, dynamic padding, mean {mean:.0f} tokens; best time of {repeats}):")
    train = replace(training(4096), dynamic_padding=True)
    for label, model, hw, gbs in searches:
        validate = compiler_rules(model, hw, train)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = search(model, hw, train, lambda k, m=model, h=hw, g=gbs: make_layout(m, h, g, k), validate,
                            efficiency, ORCA_DPO_MEAN_PADDED_TOKENS)
            times.append(time.perf_counter() - start)
        best = result.best
        knobs = dict(best.knobs) if best else None
        print(f"  {label:<34} {min(times) * 1000:7.0f} ms  {result.evaluated:>5} layouts, "
              f"{result.rule_rejected} rule-rejected, {len(result.ranked)} fit")
        for line in explain(result, top=3):
            print(f"    {line}")
        rows.append({"case": label, "seconds": min(times), "evaluated": result.evaluated,
                     "rule_rejected": result.rule_rejected, "fitting": len(result.ranked),
                     "best": knobs, "best_pairs_per_s": best.throughput.samples_per_s if best else None})
    return rows


def main() -> None:
    args = arguments(__doc__.splitlines()[0], "planner").parse_args()
    calibration = calibration_report()
    efficiency = Efficiency(**calibration["efficiency"])
    # --smoke: one search (the A2 one, the smallest space), timed once
    searches = search_report(efficiency, SEARCHES[:1], 1) if args.smoke else search_report(efficiency)
    out = write_result(args, "planner", {"calibration": calibration, "search": searches})
    if out is not None:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
