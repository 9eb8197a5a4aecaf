"""Planner benchmark: calibration on published non-DPO throughput, held-out DPO error, search time.

    /work/venv/bin/python bench/planner.py        # prints tables, writes bench/results/planner.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpoc.plan import HardwareSpec, Layout, ModelSpec, MoESpec
from dpoc.planner.calibration import (
    CALIBRATION,
    DPO_HELD_OUT,
    ORCA_DPO_MEAN_PADDED_TOKENS,
    QWEN3_30B_A3B,
    atlas_a2,
    atlas_a3,
    fit,
    implied_mean_length,
    predicted,
    training,
)
from dpoc.planner.memory import estimate_memory
from dpoc.planner.report import explain
from dpoc.planner.search import search
from dpoc.planner.throughput import Efficiency

QWEN3_235B_A22B = ModelSpec(
    name="qwen3-235b-a22b", family="qwen3_moe", num_layers=94, hidden_size=4096, ffn_hidden_size=12288,
    num_attention_heads=64, num_query_groups=4, head_dim=128, vocab_size=151936,
    max_position_embeddings=40960,
    rope_base=1e6, norm_epsilon=1e-6, qk_layernorm=True, qkv_bias=False, tie_embeddings=False,
    moe=MoESpec(num_experts=128, topk=8, ffn_hidden_size=1536, aux_loss_coeff=0.001, norm_topk_prob=True),
    mindspeed_name="qwen3_235b_a22b", converter="v2", hf_model_type="qwen3-moe",
)

RESULTS = Path(__file__).resolve().parent / "results" / "planner.json"


def build_layout(model: ModelSpec, hardware: HardwareSpec, global_batch_size: int, knobs: dict[str, Any]
                 ) -> Layout:
    """Knobs -> Layout with Megatron's derived sizes (what dpoc.layout.make_layout does in the compiler)."""
    tp, pp, cp, ep = (knobs.get(k, 1) for k in ("tp", "pp", "cp", "ep"))
    etp, vpp, mbs = knobs.get("etp", tp), knobs.get("vpp", 1), knobs.get("micro_batch_size", 1)
    world = hardware.world_size
    dp = world // (tp * pp * cp)
    noop = tuple(knobs.get("noop_layers", ()))
    layer_list = knobs.get("num_layer_list")
    stage_layers = tuple(layer_list) if layer_list else ((model.num_layers + len(noop)) // pp,) * pp
    return Layout(
        world_size=world, tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, etp=etp, dp=dp, edp=world // (etp * ep * pp),
        sequence_parallel=tp > 1, micro_batch_size=mbs, global_batch_size=global_batch_size,
        num_microbatches=global_batch_size // (mbs * dp) if dp else 0,
        recompute=knobs.get("recompute", "none"),
        recompute_method=knobs.get("recompute_method"),
        recompute_num_layers=knobs.get("recompute_num_layers"),
        num_layer_list=tuple(layer_list) if layer_list else None, noop_layers=noop, stage_layers=stage_layers,
        distributed_optimizer=True, moe_dispatcher="alltoall" if model.moe else None,
        moe_grouped_gemm=model.moe is not None, moe_permutation_async_comm=False,
        moe_alltoall_overlap_comm=False, moe_tp_extend_ep=False, moe_mc2=False,
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def calibration_report() -> dict[str, Any]:
    result = fit(build_layout)
    eff = result.efficiency
    singles = dict(result.per_case)
    rows = []
    print("Calibration set (published non-DPO throughput):")
    print(f"  {'case':<40} {'measured':>10} {'predicted':>10} {'error':>7}  own-fit eff  unit / assumed")
    for case in CALIBRATION:
        p = predicted(case, eff, build_layout)
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
    for case in DPO_HELD_OUT:
        p = predicted(case, eff, build_layout)
        err = p / case.measured - 1
        implied = implied_mean_length(case, eff, build_layout)
        padded = predicted(case, eff, build_layout, float(case.seq_length))
        layout = build_layout(case.model, case.hardware, case.global_batch_size, case.knobs)
        dynamic = replace(training(case.seq_length), dynamic_padding=True)
        peak = estimate_memory(case.model, case.hardware, layout, dynamic, ORCA_DPO_MEAN_PADDED_TOKENS).peak
        full = estimate_memory(case.model, case.hardware, layout, training(case.seq_length)).peak
        by_length = {n: predicted(case, eff, build_layout, float(n)) for n in (250, 500, 1000, 2000, 4096)}
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


def stand_in_rules(model: ModelSpec, hardware: HardwareSpec, global_batch_size: int):
    """The compiler's main layout rules, until the planner runs with `dpoc.rules` (the lead's module)."""
    world = hardware.world_size

    def validate(layout: Layout) -> list[str]:
        checks = {
            "dense grid": layout.dp > 0 and world % (layout.tp * layout.pp * layout.cp) == 0,
            "expert grid": world % (layout.etp * layout.ep * layout.pp) == 0,
            "heads": model.num_attention_heads % layout.tp == 0 and model.num_query_groups % layout.tp == 0,
            "experts": model.moe is None or model.moe.num_experts % layout.ep == 0,
            "batch": layout.dp > 0 and global_batch_size % (layout.micro_batch_size * layout.dp) == 0,
            "vpp": layout.vpp == 1 or (layout.num_layer_list is None
                                       and layout.stage_layers[0] % layout.vpp == 0),
            "microbatches": layout.pp == 1 or layout.num_microbatches >= layout.pp,
        }
        return [name for name, ok in checks.items() if not ok]
    return validate


SEARCHES = (
    ("Qwen3-30B-A3B DPO on A2 2x8", QWEN3_30B_A3B, atlas_a2(2), 64),
    ("Qwen3-30B-A3B DPO on A3 2x16", QWEN3_30B_A3B, atlas_a3(2), 64),
    ("Qwen3-235B-A22B DPO on A3 64x16", QWEN3_235B_A22B, atlas_a3(64), 1024),
)


def search_report(efficiency: Efficiency, repeats: int = 5) -> list[dict[str, Any]]:
    rows = []
    mean = ORCA_DPO_MEAN_PADDED_TOKENS
    print(f"Search (seq 4096, dynamic padding, mean {mean:.0f} tokens; best time of {repeats}):")
    train = replace(training(4096), dynamic_padding=True)
    for label, model, hw, gbs in SEARCHES:
        rules = stand_in_rules(model, hw, gbs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = search(model, hw, train, lambda k, m=model, h=hw, g=gbs: build_layout(m, h, g, k), rules,
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
    calibration = calibration_report()
    efficiency = Efficiency(**calibration["efficiency"])
    report = {"calibration": calibration, "search": search_report(efficiency)}
    _write_json(RESULTS, report)
    print(f"wrote {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}")


if __name__ == "__main__":
    main()
