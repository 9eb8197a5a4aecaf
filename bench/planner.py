"""Planner benchmark: calibration on published non-DPO throughput, held-out DPO error, search time, and the
tiny CPU recipe's predicted pairs/s against its measured ones on this machine.

    python bench/planner.py [--smoke] [--out FILE]   # prints tables, writes bench/results/planner.json

The held-out DPO rows are predicted as their framework ran them, the LM head over every position in both: MindSpeed-RL's
Qwen3-30B-A3B rows with its global-batch padding and an assumed length distribution (no download here:
`calibration.assumed_orca_lengths`, stated in the output); MindSpeed-LLM's long-sequence Llama2-7B rows (16K, 32K)
with every sequence padded to seq_length, which needs no length assumption. The tiny recipe is built, preprocessed
and trained for real (live and precomputed reference; the precompute pass timed on its own), and planned with
`training.length_stats` naming its own `_stats.json`, with lengths unknown (every micro-batch full: the old
default), and without the per-call latency terms (`hardware.op_latency_us=0`, `hardware.optimizer_tensor_us=0`:
FLOPs, communication and the optimizer's memory sweep only), each with the step's predicted shares; as shipped (2
gloo processes) and in one process. The CPU preset's constants come from `bench/cpu_constants.py`. `--smoke`: 4 steps, 1
process.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._shared import arguments, write_result
from bench.runtime_speed import ROOT, _env, prepare
from dpoc.compiler.pipeline import build
from dpoc.compiler.render import targets
from dpoc.compiler.resolve import rules
from dpoc.contract.plan import DPO, HardwareSpec, Layout, ModelSpec, Training
from dpoc.contract.specs import preset_hardware, preset_model
from dpoc.planner.calibration import (
    MINDSPEED_LLM_TRAITS,
    MINDSPEED_RL,
    Published,
    assumed_orca_lengths,
    calibration_set,
    case_lengths,
    case_training,
    dpo_held_out,
    fit,
    implied_mean_length,
    predicted,
    training,
)
from dpoc.planner.features import Traits
from dpoc.planner.layout import make_layout
from dpoc.planner.lengths import MeanLength
from dpoc.planner.memory import estimate_memory
from dpoc.planner.report import explain
from dpoc.planner.search import search
from dpoc.planner.throughput import Efficiency

# the code this benchmark measures: its results' provenance (bench/_shared.provenance)
MEASURES = ("bench/planner.py", "dpoc/planner", "dpoc/compiler", "dpoc/presets", "dpoc/runtime")


def calibration_report() -> dict[str, Any]:
    result = fit()
    eff = result.efficiency
    singles = dict(result.per_case)
    cases = calibration_set()
    rows = []
    print("Calibration set (published non-DPO throughput; every row is in-sample: the efficiencies are fitted to "
          "them, so their errors are no validation; leave-one-out: the error with the row left out of the fit):")
    print(f"  {'case':<40} {'measured':>10} {'predicted':>10} {'error':>7} {'left out':>9}  own-fit eff  "
          "unit / assumed")
    for case in cases:
        p = predicted(case, eff)
        err = p / case.measured - 1
        own = singles.get(case.label)
        left_out = predicted(case, fit(tuple(c for c in cases if c is not case)).efficiency) / case.measured - 1
        rows.append({"case": case.label, "unit": case.unit, "measured": case.measured, "predicted": p,
                     "error": err, "in_sample": True, "fitted": fitted_as(case, cases),
                     "leave_one_out_error": left_out, "own_fit_dense_efficiency": own, "source": case.source,
                     "assumed": case.assumed})
        own_txt = f"{own:.3f}" if own is not None else "  -  "
        print(f"  {case.label:<40} {case.measured:>10.1f} {p:>10.1f} {err:>+7.1%} {left_out:>+9.1%}  {own_txt:>11}  "
              f"{case.unit}; {case.assumed}")
    print(f"Fitted efficiency: dense {eff.dense:.3f}, routed experts {eff.experts:.3f}")
    held = []
    lengths = assumed_orca_lengths()
    print(f"Held-out DPO, each as its framework ran it (the head over every position in both): MindSpeed-RL's "
          f"MoE rows (lengths {lengths.source}; per-pair longer side, cut at 4096) with every micro-batch padded "
          "to the longest of its 64-pair global batch (rounded to 8); MindSpeed-LLM's Llama2-7B rows with every "
          "sequence padded to seq_length (no length assumption). Also as the dpoc runtime would batch them "
          "(each step sorted, micro-batches padded to their longest) and padded to seq_length:")
    for case in dpo_held_out():
        traits = held_out_traits(case)
        p = predicted(case, eff, traits=traits)
        err = p / case.measured - 1
        sorted_cut = predicted(case, eff)
        implied = implied_mean_length(case, eff, traits)
        padded = predicted(case, eff, MeanLength(case.seq_length), traits=traits)
        layout = make_layout(case.model, case.hardware, case.global_batch_size, case.knobs)
        peak = estimate_memory(case.model, case.hardware, layout, case_training(case), case_lengths(case),
                               traits=traits).peak
        full = estimate_memory(case.model, case.hardware, layout, training(case.seq_length), traits=traits).peak
        by_length = {n: predicted(case, eff, MeanLength(n), traits) for n in (250, 500, 1000, 2000, 4096)
                     if n <= case.seq_length}
        held.append({"case": case.label, "unit": case.unit, "measured": case.measured, "predicted": p,
                     "in_sample": False, "runner": case.runner, "batching": traits.batching,
                     "predicted_by_mean_padded_tokens": by_length,
                     "error": err, "implied_mean_padded_tokens": implied,
                     "predicted_sort_and_cut": sorted_cut, "error_sort_and_cut": sorted_cut / case.measured - 1,
                     "predicted_if_padded_to_seq_length": padded,
                     "error_if_padded_to_seq_length": padded / case.measured - 1,
                     "peak_memory_gib_dynamic": peak.total / 2**30,  # as the row ran (see the schema)
                     "peak_memory_gib_padded": full.total / 2**30,
                     "source": case.source, "assumed": case.assumed})
        implied_text = f">= {case.seq_length}" if implied >= case.seq_length else f"{implied:.0f}"
        print(f"  {case.label:<40} {case.measured:>6.2f} pairs/s  predicted {p:>6.2f}  error {err:>+7.1%}")
        print(f"    sort-and-cut: {sorted_cut:.2f} ({sorted_cut / case.measured - 1:+.1%}); padded to "
              f"{case.seq_length}: {padded:.2f} ({padded / case.measured - 1:+.1%}); the model matches at a mean "
              f"padded length of {implied_text} tokens; peak memory ({case.runner}'s features) "
              f"{peak.total / 2**30:.1f} GiB ({traits.batching}), {full.total / 2**30:.1f} GiB (all padded)")
        print("    pairs/s by mean padded length: "
              + ", ".join(f"{n}: {v:.2f}" for n, v in by_length.items()))
    summary = {"held_out_dpo": error_stats([r["error"] for r in held]),
               "calibration_left_out": error_stats([r["leave_one_out_error"] for r in rows]),
               "in_sample_rows": "not summarised: fitted rows say nothing about the model's error"}
    for name, stats in (("held-out DPO", summary["held_out_dpo"]),
                        ("calibration, each row left out of the fit", summary["calibration_left_out"])):
        print(f"Error over {name} ({stats['rows']} rows): median |error| {stats['median_abs']:.1%}, "
              f"worst {stats['worst']:+.1%}")
    return {"calibration": rows, "efficiency": {"dense": eff.dense, "experts": eff.experts},
            "held_out_dpo": held, "error_summary": summary, "orca_lengths_assumed": lengths.summary()}


def held_out_traits(case: Published) -> Traits:
    """How the framework that ran a held-out DPO row batched it and where its head ran."""
    if case.runner == MINDSPEED_RL:
        return targets.get(MINDSPEED_RL).traits(case.hardware)
    return MINDSPEED_LLM_TRAITS


def fitted_as(case: Published, cases: tuple[Published, ...]) -> str:
    """What the fit takes from this row (calibration.fit): the dense geometric mean, or the experts' fit."""
    dense, moe = sum(c.model.moe is None for c in cases), sum(c.model.moe is not None for c in cases)
    if case.model.moe is None:
        return f"one of the {dense} dense rows whose geometric mean is the dense efficiency"
    if moe == 1:
        return "the only row the routed experts' efficiency is fitted to, exactly: its error is 0 by construction"
    return f"one of the {moe} MoE rows whose geometric mean is the routed experts' efficiency"


def error_stats(errors: list[float]) -> dict[str, Any]:
    """Relative errors summarised: how many, median and mean of |error|, and the worst (signed)."""
    absolute = [abs(e) for e in errors]
    return {"rows": len(errors), "median_abs": statistics.median(absolute), "mean_abs": statistics.fmean(absolute),
            "worst": max(errors, key=abs)}


DPO_LOSS = DPO(loss="sigmoid", beta=0.1, label_smoothing=0.0, sft_weight=0.0)


def compiler_rules(model: ModelSpec, hardware: HardwareSpec, train: Training) -> Callable[[Layout], list[str]]:
    """`dpoc.compiler.resolve.rules` as the compiler applies them: a violation that is not a warning rejects the
    layout."""
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
    lengths = assumed_orca_lengths()
    print(f"Search (seq 4096, dynamic padding, lengths {lengths.source}; best time of {repeats}):")
    train = replace(training(4096), dynamic_padding=True)
    for label, model, hw, gbs in searches:
        validate = compiler_rules(model, hw, train)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = search(model, hw, train, lambda k, m=model, h=hw, g=gbs: make_layout(m, h, g, k), validate,
                            efficiency, lengths)
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


TINY = ROOT / "recipes" / "tiny_cpu.yaml"


PROCESSES = (2, 1)  # as shipped (dp 2), and one process: the per-process model without the second's company


def tiny_cpu_report(steps: int, warmup: int, processes: tuple[int, ...] = PROCESSES) -> dict[str, Any]:
    """The tiny recipe on this machine (2 gloo processes as shipped, and 1): predicted pairs/s (from its own
    length stats, with lengths unknown, and without the latency term) against the runtime's measured ones,
    live and precomputed."""
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = prepare(tmp)
        for count in processes:
            rows[f"{count} processes"] = {mode: tiny_cpu_row(tmp / f"{count}-{mode}", data, count, mode, steps, warmup)
                                          for mode in ("live", "precomputed")}
    print(f"Tiny CPU recipe on this machine ({steps} steps, median after {warmup}; the machine may be shared):")
    for layout, modes in rows.items():
        for mode, r in modes.items():
            extra = ""
            if "precompute_pass_s" in r:
                extra = (f"; precompute pass {r['precompute_pass_s']:.1f} s (predicted "
                         f"{r['precompute_pass_predicted']['pairs_per_s']:.0f} pairs/s)")
            shares = ", ".join(f"{part} {share:.0%}" for part, share in r["predicted_step_shares"].items())
            print(f"  {layout}, {mode:<11} measured {r['measured_pairs_per_s']:6.1f} pairs/s, predicted "
                  f"{r['predicted_pairs_per_s']:6.1f} ({r['error']:+.1%}) from its length stats ({shares}); "
                  f"{r['predicted_lengths_unknown']:.1f} ({r['error_lengths_unknown']:+.1%}) with lengths unknown, "
                  f"{r['predicted_without_latency']:.1f} ({r['error_without_latency']:+.1%}) without the latency "
                  f"terms{extra}")
    return {"steps": steps, "warmup": warmup, "layouts": rows}


def tiny_cpu_row(tmp: Path, data: Path, processes: int, mode: str, steps: int, warmup: int) -> dict[str, Any]:
    """One layout and reference mode of the tiny recipe: planned three ways, trained for real."""
    common = [f"hardware.devices_per_node={processes}", f"training.train_iters={steps}", "training.warmup_iters=0",
              f"dataset.output_prefix={data}", f"dpo.reference={mode}"]
    unknown = plan_of(tmp / "unknown", common)
    known = [*common, f"training.length_stats={data}_stats.json"]
    flops_only = plan_of(tmp / "flops-only", [*known, "hardware.op_latency_us=0", "hardware.optimizer_tensor_us=0"])
    out, run_dir = tmp / "build", tmp / "run"
    build(TINY, [*known, f"run_dir={run_dir}"], out=out)
    plan = json.loads((out / "plan.json").read_text())
    env = _env()
    row: dict[str, Any] = {}
    if mode == "precomputed":  # timed on its own; the node script then finds the file current
        started = time.perf_counter()
        subprocess.run(["bash", str(out / "reference.sh")], cwd=ROOT, env=env, check=True, capture_output=True,
                       timeout=1800)
        row["precompute_pass_s"] = time.perf_counter() - started
        row["precompute_pass_predicted"] = plan["estimate"]["reference_pass"]
    subprocess.run(["bash", str(out / "launch.sh")], cwd=ROOT, env=env, check=True, capture_output=True, timeout=1800)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = statistics.median(r["samples_per_s"] for r in records[warmup:])
    predicted_pairs = plan["estimate"]["throughput"]["samples_per_s"]
    unknown_pairs = unknown["estimate"]["throughput"]["samples_per_s"]
    flops_pairs = flops_only["estimate"]["throughput"]["samples_per_s"]
    row.update(measured_pairs_per_s=measured, predicted_pairs_per_s=predicted_pairs,
               error=predicted_pairs / measured - 1, padding=plan["estimate"].get("padding"),
               predicted_step_shares=plan["estimate"]["throughput"]["step_shares"],
               predicted_lengths_unknown=unknown_pairs, error_lengths_unknown=unknown_pairs / measured - 1,
               predicted_without_latency=flops_pairs, error_without_latency=flops_pairs / measured - 1)
    return row


def plan_of(out: Path, overrides: list[str]) -> dict[str, Any]:
    build(TINY, overrides, out=out)
    return json.loads((out / "plan.json").read_text())


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], "planner")
    parser.add_argument("--tiny-only", action="store_true",
                        help="re-measure only the tiny CPU rows and print them; writes no result (its other "
                             "parts would not be measured at the same time)")
    args = parser.parse_args()
    # --smoke: the tiny recipe for 4 steps, 1 process; one search (the A2 one, the smallest space), timed once
    tiny = (lambda: tiny_cpu_report(4, 1, (1,))) if args.smoke else (lambda: tiny_cpu_report(30, 3))
    if args.tiny_only:
        tiny()
        return
    calibration = calibration_report()
    efficiency = Efficiency(**calibration["efficiency"])
    searches = search_report(efficiency, SEARCHES[:1], 1) if args.smoke else search_report(efficiency)
    out = write_result(args, "planner", {"calibration": calibration, "search": searches, "tiny_cpu": tiny()},
                       MEASURES)
    if out is not None:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
