"""Planner benchmark: calibration on published non-DPO throughput, held-out DPO error, search time.

    /work/venv/bin/python bench/planner.py        # prints tables, writes bench/results/planner.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpoc.plan import HardwareSpec, Layout, ModelSpec
from dpoc.planner.calibration import (
    CALIBRATION,
    DPO_HELD_OUT,
    ORCA_DPO_MEAN_PADDED_TOKENS,
    fit,
    implied_mean_length,
    predicted,
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
        held.append({"case": case.label, "unit": case.unit, "measured": case.measured, "predicted": p,
                     "error": err, "implied_mean_padded_tokens": implied, "source": case.source,
                     "assumed": case.assumed})
        print(f"  {case.label:<40} {case.measured:>6.2f} pairs/s  predicted {p:>6.2f}  error {err:>+7.1%}  "
              f"(matches at a mean padded length of {implied:.0f} tokens)")
    return {"calibration": rows, "efficiency": {"dense": eff.dense, "experts": eff.experts},
            "held_out_dpo": held, "orca_mean_padded_tokens_assumed": ORCA_DPO_MEAN_PADDED_TOKENS}


def main() -> None:
    report = {"calibration": calibration_report()}
    _write_json(RESULTS, report)
    print(f"wrote {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}")


if __name__ == "__main__":
    main()
