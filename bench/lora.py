"""LoRA-DPO: pairs/s and peak RSS of the dpoc runtime vs TRL's DPOTrainer + PEFT, and dpoc's full-parameter vs
LoRA memory, measured beside the planner's prediction.

    python bench/lora.py [--pairs 256 --steps 6 --warmup 2 --rounds 3 --threads 1,2 --micro-batches 8,4,2,1 \
        --packed 8,2 --memory-layouts single,tp2-sp] [--smoke] [--out FILE.json]

Throughput: bench/dpo_vs_trl.py's setup, sweep, clock and rounds, reused as they are (the same seeded tiny Qwen3
saved once, the same token ids, the same step order, sigmoid DPO beta 0.1, Adam(W) lr 1e-5, clipping 1.0, fp32,
no gradient checkpointing, every point a fresh process, threads x micro-batch / accumulation x each side's padding
removal x live / precomputed reference, interleaved rounds, best = highest median); what changes is that both sides
train LoRA adapters only: rank 8, alpha 16, no dropout, on every attention and MLP linear (dpoc `--lora-r 8
--lora-alpha 16` on linear_qkv, linear_proj, linear_fc1, linear_fc2; TRL `peft_config=LoraConfig(...)` on q, k, v,
o, gate, up and down_proj), the reference being the frozen base on both (dpoc: the policy with its adapters off;
TRL: the PEFT model with its adapters disabled; precomputed: each side's pass over the base).

The same adapters. dpoc draws A under the run's seed (`lora.initial_adapters`); the bench writes those values in
PEFT's key names (`peft.to_peft`: linear_qkv's A becomes q, k and v's shared A) and loads them into TRL's fresh
PEFT model, so both sides start from identical adapters (B zero). The bench asserts what that makes equal: step
1's loss is ln 2 on both, its policy log-probs and gradient norm agree (with B zero only B has a gradient, and
B_q, B_k, B_v's equal the rows of the fused B's), and so does the loss after the first update (A has had no
gradient yet). From step 2 on the two parameterisations differ by construction: megatron-core fuses q/k/v and
gate/up, so dpoc's adapter on each fused linear has one A where PEFT trains one per HF linear (the adapter
parameter counts of each side are reported); the timing compares the same model, tokens and rank per linear.

Peak RSS: each worker's `ru_maxrss` at its end (the whole training process: weights, adapters, optimizer, data,
activations, the libraries). TRL's precomputed points include its in-process precompute pass; dpoc's pass runs in
its own process before training (timed, its RSS not counted). Beside dpoc's LoRA best, one dpoc full-parameter
run at the same point (one round, not timed against anything) shows what LoRA saves in the same process.

Memory against the planner: bench/memory_vs_measured.py's layouts (`--memory-layouts`, each with its `-lora`
twin: the same tiny model, rank 4, alpha 8), run by its `measure` (the runtime's memory probe, one step) and
compared by its `compare` with the planner's `estimate_memory`: weights, gradients, optimizer state, reference and
one micro-batch's activations, predicted and measured per rank, and their sum (the tensor peak the planner
models), full-parameter against LoRA.

`--smoke`: the one-layer hidden-64 Qwen3 of dpo_vs_trl's smoke, 16 pairs, 3 steps, one round, one thread,
micro-batch 4 and packed budget 4, the single-process memory layouts only (its numbers mean nothing). Needs the
`bench` extra (trl, peft, datasets).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import dpo_vs_trl as base  # noqa: E402
from bench import memory_vs_measured as memory  # noqa: E402
from bench._shared import arguments  # noqa: E402
from bench.dpo_vs_trl import AGREEMENT, REFERENCES, STEP_PAIRS, Config  # noqa: E402

RANK, ALPHA = 8, 16.0
LN2 = math.log(2)
FIRST_LOSS_TOLERANCE = 1e-5  # |step 1's loss - ln 2|: a precomputed reference's fp32 sums differ from the live ones
MEMORY_LAYOUTS, SMOKE_MEMORY_LAYOUTS = ("single", "tp2-sp"), ("single",)
ADAPTER_DIR = "initial-adapter"

# the code this benchmark measures: its results' provenance (bench/_shared.provenance)
MEASURES = ("bench/lora.py", "bench/dpo_vs_trl.py", "bench/memory_vs_measured.py", "dpoc/runtime", "dpoc/data",
            "dpoc/planner")


def lora_settings():
    from dpoc.contract.lora import MCORE_TARGETS, Lora

    return Lora(rank=RANK, alpha=ALPHA, dropout=0.0, targets=MCORE_TARGETS, experts=False, init_from=None)


def dpoc_lora_flags() -> list[tuple[str, object]]:
    """What `dpoc build` adds to megatron.args for the `lora:` section (dpoc_runtime._lora_args)."""
    lora = lora_settings()
    return [("--lora-r", lora.rank), ("--lora-alpha", lora.alpha), ("--lora-dropout", lora.dropout),
            ("--lora-target-modules", lora.targets)]


def write_initial_adapter(model: dict, directory: Path) -> dict[str, int]:
    """dpoc's initial adapters for `model` as a PEFT adapter directory (dpoc's exporter), which TRL's worker
    loads; the number of adapter parameters each side trains (dpoc's fused linears share one A, PEFT's HF
    linears have one each)."""
    from dpoc.runtime.model.lora import initial_adapters
    from dpoc.runtime.weights import peft

    arch = base.architecture(model)
    adapters = initial_adapters(arch, lora_settings(), base.SEED)
    peft.write(directory, adapters, arch, lora_settings(), None)
    return {"dpoc": sum(a.numel() + b.numel() for a, b in adapters.values()),
            "trl": sum(t.numel() for t in peft.to_peft(adapters, arch).values())}


def train_trl_lora(config: Config, spec: dict) -> dict:
    """TRL's DPOTrainer with a fresh PEFT LoRA (its own path: `peft_config`), its adapters set to dpoc's."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    lora = lora_settings()
    peft_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                             target_modules=list(lora.hf_targets), task_type="CAUSAL_LM")
    from dpoc.runtime.weights.peft import WEIGHTS

    return base.train_trl(config, spec, peft_config, load_file(str(Path(spec["adapter"]) / WEIGHTS)))


def lora_agreement(result: dict, baseline: dict) -> dict[str, float]:
    """dpo_vs_trl's agreement with the baseline point, and step 1's loss against ln 2 (the policy is the base)."""
    return {**base.agreement(result, baseline), "first loss - ln 2": abs(result["metrics"][0]["loss"] - LN2)}


TOLERANCE = {**AGREEMENT, "first loss - ln 2": FIRST_LOSS_TOLERANCE}


def summarise(config: Config, results: list[dict], warmup: int) -> dict:
    """The point's median and best round in pairs/s, and its peak RSS (the largest over its rounds)."""
    rates = base.round_rates(results, warmup)
    precomputes = [r["precompute_s"] for r in results if r["precompute_s"]]
    return {
        "configuration": config.name, **base.asdict(config), "pairs_per_s_median": statistics.median(rates),
        "pairs_per_s_best": max(rates), "pairs_per_s_every_round": rates,
        "step_s_every_round": [r["step_s"] for r in results],
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results),
        "peak_rss_bytes_every_round": [r["peak_rss_bytes"] for r in results],
        "precompute_s_median": statistics.median(precomputes) if precomputes else None,
        "fill": results[0]["fill"], "first_steps": results[0]["metrics"][:2],
    }


def comparison(rows: list[dict], full: dict[str, dict]) -> dict:
    """Each side's best point (highest median) per reference, over every thread count and at each: pairs/s and
    peak RSS, and the ratios; each side's smallest peak RSS over its points; dpoc full-parameter at dpoc's best."""
    out = {}
    for reference in REFERENCES:
        dpoc, trl = base._best(rows, "dpoc", reference), base._best(rows, "trl", reference)
        at = {}
        for threads in sorted({r["threads"] for r in rows}):
            same = [r for r in rows if r["threads"] == threads]
            at[str(threads)] = base._best(same, "dpoc", reference)["pairs_per_s_median"] \
                / base._best(same, "trl", reference)["pairs_per_s_median"]
        smallest = {side: min(r["peak_rss_bytes"] for r in rows if r["side"] == side and r["reference"] == reference)
                    for side in ("dpoc", "trl")}
        out[reference] = {
            "dpoc_best": dpoc["configuration"], "trl_best": trl["configuration"],
            "dpoc_pairs_per_s_median": dpoc["pairs_per_s_median"], "trl_pairs_per_s_median": trl["pairs_per_s_median"],
            "dpoc_over_trl": dpoc["pairs_per_s_median"] / trl["pairs_per_s_median"],
            "dpoc_over_trl_best_rounds": base._best(rows, "dpoc", reference, "pairs_per_s_best")["pairs_per_s_best"]
            / base._best(rows, "trl", reference, "pairs_per_s_best")["pairs_per_s_best"],
            "dpoc_over_trl_at_threads": at,
            "dpoc_peak_rss_bytes": dpoc["peak_rss_bytes"], "trl_peak_rss_bytes": trl["peak_rss_bytes"],
            "trl_rss_over_dpoc": trl["peak_rss_bytes"] / dpoc["peak_rss_bytes"],
            "dpoc_smallest_peak_rss_bytes": smallest["dpoc"], "trl_smallest_peak_rss_bytes": smallest["trl"],
            "dpoc_full_parameter": full[reference],
            "full_parameter_rss_over_lora": full[reference]["peak_rss_bytes"] / dpoc["peak_rss_bytes"],
        }
    return out


def full_parameter_point(config: Config, ws, steps: int, warmup: int, work: Path, device: str) -> dict:
    """dpoc without LoRA at `config`, one round (dpo_vs_trl's own worker): its pairs/s and peak RSS."""
    work.mkdir()
    result = base.run_point(config, ws, steps, work, device)
    return {"configuration": config.name, "pairs_per_s": base.round_rates([result], warmup)[0],
            "peak_rss_bytes": result["peak_rss_bytes"], "first_loss": result["metrics"][0]["loss"]}


# --- full-parameter vs LoRA memory, against the planner ---------------------------------------------------------

def memory_layouts(names: list[str], work: Path) -> dict:
    """Each memory_vs_measured layout and its `-lora` twin run with the memory probe and compared with the
    planner (its `measure` and `compare`); per mode the rank-summed static and activation bytes, predicted and
    measured, and what LoRA keeps of the full-parameter figures."""
    from dpoc.planner.lengths import parse_stats
    from tests.runtime.synthetic import pair_stats, write_pairs

    work.mkdir()
    data = write_pairs(work / "pairs", pairs=memory.PAIRS)
    lengths = parse_stats(pair_stats(memory.PAIRS, memory.SEQ_LENGTH), "the synthetic pairs' stats")
    out = {}
    for name in names:
        modes = {}
        for mode, layout in (("full", name), ("lora", f"{name}-lora")):
            preset, processes, parallelism, *other = memory.LAYOUTS[layout]
            overrides = other[0] if other else []
            plan = memory.compile_layout(preset, processes, parallelism, overrides)
            rows = memory.compare(plan, memory.measure(plan, data, work / layout), lengths)
            memory.print_table(f"{layout} ({preset})", plan, rows)
            totals = {side: {part: sum(r[side][part] for r in rows) for part in ("static", "activations")}
                      for side in ("predicted", "measured")}
            for side in totals.values():
                side["peak"] = side["static"] + side["activations"]
            modes[mode] = {"layout": layout, "model": preset, "processes": processes, "parallelism": parallelism,
                           "overrides": overrides, "ranks": rows, **totals,
                           "error": {k: (totals["predicted"][k] - totals["measured"][k]) / totals["measured"][k]
                                     for k in ("static", "activations", "peak")}}
        out[name] = {**modes, "lora_over_full": {
            side: {k: modes["lora"][side][k] / modes["full"][side][k] for k in ("static", "activations", "peak")}
            for side in ("predicted", "measured")}}
    return out


# --- the run -------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__.splitlines()[0], "lora")
    parser.add_argument("--pairs", type=int, default=256, help="dataset size (--smoke: 16)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (--smoke: 3)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing (--smoke: 1)")
    parser.add_argument("--rounds", type=int, default=base.MIN_ROUNDS, help="each point runs once per round "
                        "(--smoke: 1)")
    parser.add_argument("--threads", type=base._ints, default=[1, 2], help="thread counts swept (--smoke: 1)")
    parser.add_argument("--micro-batches", type=base._ints, default=[8, 4, 2, 1], help="micro-batches swept for "
                        f"both sides, accumulating to {STEP_PAIRS} pairs (--smoke: 4)")
    parser.add_argument("--packed", type=base._ints, default=[8, 2], help="dpoc's packed budgets (--smoke: 4)")
    parser.add_argument("--memory-layouts", type=lambda t: t.split(","), default=list(MEMORY_LAYOUTS),
                        help="memory_vs_measured layouts with a -lora twin (--smoke: "
                             f"{','.join(SMOKE_MEMORY_LAYOUTS)})")
    parser.add_argument("--device", choices=sorted(base.BACKEND), default="cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        base.worker(args.worker, {"dpoc": base.train_dpoc, "trl": train_trl_lora})
        return 0
    if args.smoke:
        args.pairs, args.steps, args.warmup, args.rounds = 16, 3, 1, 1
        args.threads, args.micro_batches, args.packed = [1], [4], [4]
        args.memory_layouts = list(SMOKE_MEMORY_LAYOUTS)
    elif args.rounds < base.MIN_ROUNDS or args.warmup < 1 or args.steps <= args.warmup:
        parser.error(f"--rounds must be at least {base.MIN_ROUNDS}, --warmup at least 1 and --steps above --warmup")
    unknown = [n for n in args.memory_layouts if f"{n}-lora" not in memory.LAYOUTS]
    if unknown:
        parser.error(f"--memory-layouts: {unknown[0]} has no -lora twin in bench/memory_vs_measured.py's LAYOUTS "
                     f"(valid: {', '.join(n.removesuffix('-lora') for n in memory.LAYOUTS if n.endswith('-lora'))})")
    uptime_before, load_before = base._uptime(), os.getloadavg()
    checks: dict[str, dict[str, float]] = {}
    baseline = None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ws = base.prepare(tmp, args.pairs, args.steps, base.SMOKE_MODEL if args.smoke else base.MODEL)
        adapter_parameters = write_initial_adapter(ws.model, tmp / ADAPTER_DIR)
        padding_free = base.trl_padding_free_probe(ws, tmp, args.device)
        configs = base.configurations(args.threads, args.micro_batches, args.packed,
                                      padding_free["trainer_padding_free"])
        results: dict[Config, list[dict]] = {c: [] for c in configs}
        for round_ in range(args.rounds):
            for config in base.round_order(configs, round_):
                work = tmp / f"round{round_}-point{configs.index(config)}"
                work.mkdir()
                result = base.run_point(config, ws, args.steps, work, args.device, dpoc_lora_flags(), __file__,
                                        adapter=str(tmp / ADAPTER_DIR))
                baseline = baseline or result
                checks[config.name] = lora_agreement(result, baseline)
                results[config].append(result)
                print(f"round {round_ + 1}: {config.name:72s} {base.round_rates([result], args.warmup)[0]:6.2f} "
                      f"pairs/s, peak RSS {result['peak_rss_bytes'] / 2**20:7.1f} MiB", flush=True)
        rows = [summarise(c, results[c], args.warmup) for c in configs]
        full = {}
        for reference in REFERENCES:
            best = next(c for c in configs if c.name == base._best(rows, "dpoc", reference)["configuration"])
            full[reference] = full_parameter_point(best, ws, args.steps, args.warmup, tmp / f"full-{reference}",
                                                   args.device)
        compared = comparison(rows, full)
        layouts = memory_layouts(args.memory_layouts, tmp / "memory")
    worst = {k: max(c[k] for c in checks.values()) for k in TOLERANCE}
    print_table(rows, compared, layouts)
    summary = {
        "size": "smoke" if args.smoke else "full",
        "setup": {"model": ws.model, "pairs": args.pairs, "step_pairs": STEP_PAIRS, "steps": args.steps,
                  "warmup_steps_left_out": args.warmup, "rounds": args.rounds, "threads": args.threads,
                  "micro_batches": args.micro_batches, "dpoc_packed_budgets": args.packed, "device": args.device,
                  "seq_length": base.SEQ_LENGTH, "lr": base.LR, "beta": base.BETA, "clip_grad": base.CLIP,
                  "lora": {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "dpoc_targets": list(lora_settings().targets),
                           "trl_targets": list(lora_settings().hf_targets)},
                  "adapter_parameters": adapter_parameters, "trl_padding_free": padding_free,
                  "uptime_before": uptime_before, "uptime_after": base._uptime(),
                  "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "configurations": rows,
        "comparison": compared,
        "agreement": {"worst": worst, "tolerance": TOLERANCE, "per_configuration": checks},
        "memory": {"layouts": layouts, "memory_layouts": args.memory_layouts},
    }
    return base.finish(args, "lora", summary, MEASURES, worst, TOLERANCE)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def print_table(rows: list[dict], compared: dict, layouts: dict) -> None:
    print(f"\n{'point (LoRA rank 8 on both sides)':72s} {'median':>7s} {'best':>6s} {'peak RSS':>11s}  precompute")
    for r in rows:
        pre = f"{r['precompute_s_median']:.1f} s" if r["precompute_s_median"] else ""
        print(f"{r['configuration']:72s} {r['pairs_per_s_median']:7.2f} {r['pairs_per_s_best']:6.2f} "
              f"{_mib(r['peak_rss_bytes']):>11s}  {pre}")
    for reference in REFERENCES:
        c = compared[reference]
        at = ", ".join(f"{x:.2f}x at {t} thread(s)" for t, x in c["dpoc_over_trl_at_threads"].items())
        f = c["dpoc_full_parameter"]
        print(f"{reference}: {c['dpoc_best']} ({c['dpoc_pairs_per_s_median']:.2f} pairs/s, "
              f"{_mib(c['dpoc_peak_rss_bytes'])}) / {c['trl_best']} ({c['trl_pairs_per_s_median']:.2f} pairs/s, "
              f"{_mib(c['trl_peak_rss_bytes'])}) = {c['dpoc_over_trl']:.2f}x in medians, best rounds "
              f"{c['dpoc_over_trl_best_rounds']:.2f}x; {at}; TRL's RSS {c['trl_rss_over_dpoc']:.2f}x dpoc's; "
              f"dpoc full-parameter there: {f['pairs_per_s']:.2f} pairs/s, {_mib(f['peak_rss_bytes'])} "
              f"({c['full_parameter_rss_over_lora']:.2f}x LoRA's RSS)")
    for name, layout in layouts.items():
        for mode in ("full", "lora"):
            m = layout[mode]
            print(f"memory {m['layout']}: static {_mib(m['predicted']['static'])} predicted / "
                  f"{_mib(m['measured']['static'])} measured ({m['error']['static']:+.1%}), activations "
                  f"{_mib(m['predicted']['activations'])} / {_mib(m['measured']['activations'])} "
                  f"({m['error']['activations']:+.1%}), peak {m['error']['peak']:+.1%}")
        ratio = layout["lora_over_full"]
        print(f"memory {name}: LoRA keeps {ratio['predicted']['peak']:.1%} of full-parameter's peak predicted, "
              f"{ratio['measured']['peak']:.1%} measured (static {ratio['predicted']['static']:.1%} / "
              f"{ratio['measured']['static']:.1%})")


if __name__ == "__main__":
    sys.exit(main())
