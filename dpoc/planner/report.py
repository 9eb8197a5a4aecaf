"""Plain data and text of planner results, for plan.json, `dpoc plan --json` and the `dpoc plan` table.

Values are rounded so that plan.json stays byte-stable and readable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dpoc.contract.plan import Layout, Training
from dpoc.planner.features import SORT_AND_CUT, MemoryFeatures, Traits
from dpoc.planner.lengths import Lengths
from dpoc.planner.memory import GIB, MemoryEstimate, StageMemory
from dpoc.planner.throughput import ReferencePass, Throughput

if TYPE_CHECKING:
    from dpoc.planner.search import Candidate, SearchResult

PARTS = ("weights", "gradients", "optimizer", "reference", "activations", "pipeline_buffers", "logits",
         "transient", "comm_buffers", "reserve")
KNOB_ORDER = ("tp", "pp", "vpp", "cp", "ep", "etp", "micro_batch_size", "recompute", "num_layer_list",
              "noop_layers")


def _gib(nbytes: float) -> float:
    return round(nbytes / GIB, 3)


def stage_summary(stage: StageMemory) -> dict[str, Any]:
    return {"stage": stage.stage, "layers": stage.layers, "params": stage.params,
            **{f"{part}_gib": _gib(getattr(stage, part)) for part in PARTS}, "total_gib": _gib(stage.total)}


def memory_summary(memory: MemoryEstimate) -> dict[str, Any]:
    return {"capacity_gib": _gib(memory.capacity), "fits": memory.fits, "peak_stage": memory.peak.stage,
            "peak_gib": _gib(memory.peak.total), "stages": [stage_summary(s) for s in memory.stages]}


def throughput_summary(throughput: Throughput) -> dict[str, Any]:
    return {"step_s": round(throughput.step_s, 4), "samples_per_s": round(throughput.samples_per_s, 3),
            "tokens_per_s": round(throughput.tokens_per_s, 1), "mfu": round(throughput.mfu, 4),
            "dpo_mfu": round(throughput.dpo_mfu, 4),
            "step_shares": {part: round(share, 4) for part, share in throughput.shares().items()}}


def full_parameter_summary(memory: MemoryEstimate, throughput: Throughput) -> dict[str, Any]:
    """LoRA's alternative at the same layout: every parameter trained (weights, gradients, optimizer state and the
    reference copy of the whole model)."""
    peak = memory.peak
    return {"fits": memory.fits, "peak_gib": _gib(peak.total), "peak_stage": peak.stage,
            "static_gib": _gib(peak.static), "samples_per_s": round(throughput.samples_per_s, 3),
            "mfu": round(throughput.mfu, 4)}


def shares_text(throughput: Throughput) -> str:
    """`step 0.1137 s: compute 12%, latency 80%, ...`: where the predicted step's time goes."""
    return f"step {throughput.step_s:.4g} s: " + ", ".join(
        f"{part} {share:.0%}" for part, share in throughput.shares().items())


def packing_summary(layout: Layout, training: Training, lengths: Lengths) -> dict[str, Any]:
    """What packing makes of a step (`planner.packing`): micro-batches per rank, pairs in each, the fill."""
    steps = lengths.packed(layout, training)
    return {"budget_tokens": steps.budget, "micro_batches": round(steps.micro_batches, 3),
            "pairs_per_micro_batch": round(steps.pairs_per_micro_batch, 3), "fill": round(steps.fill, 4)}


def padding_summary(layout: Layout, training: Training, lengths: Lengths, batching: str = SORT_AND_CUT
                    ) -> dict[str, Any]:
    """The padded tokens per sequence the plan assumes: the slowest rank's micro-batches on average, and the
    longest one (what memory is planned for)."""
    rows = lengths.micro_batches(layout, training, batching)
    return {"mean_padded_tokens": round(rows.mean, 2), "longest_tokens": round(rows.peak, 2)}


def traits_summary(traits: Traits) -> dict[str, Any]:
    """The target's batching, memory features and LM head positions the estimate models."""
    f = traits.features
    return {"name": traits.target, "batching": traits.batching, "reuse_fp32_param": f.reuse_fp32_param,
            "flash_stats_fp32_per_head": f.flash_stats, "response_head": traits.response_head}


def summary_traits(summary: dict[str, Any]) -> Traits:
    """The Traits a plan's `estimate.target` (`traits_summary`) records: what a reader of plan.json plans with."""
    return Traits(summary["name"], summary["batching"],
                  MemoryFeatures(reuse_fp32_param=summary["reuse_fp32_param"],
                                 flash_stats=summary["flash_stats_fp32_per_head"]),
                  response_head=summary["response_head"])


def reference_pass_summary(estimate: ReferencePass, memory: MemoryEstimate) -> dict[str, Any]:
    """The precompute pass of precomputed reference log-probs: its micro-batch, speed and memory."""
    seconds = None if estimate.seconds is None else round(estimate.seconds, 3)
    return {"micro_batch_size": estimate.micro_batch_size, "pairs_per_s": round(estimate.pairs_per_s, 3),
            "seconds": seconds, "peak_gib": _gib(memory.peak.total), "fits": memory.fits}


def knob_text(knobs: dict[str, Any]) -> str:
    def show(value: Any) -> str:
        return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)
    return " ".join(f"{k}={show(knobs[k])}" for k in KNOB_ORDER if k in knobs and knobs[k] not in ((), None))


def candidate_line(candidate: Candidate) -> str:
    text = knob_text(dict(candidate.knobs))
    peak = candidate.memory.peak if candidate.memory else None
    if candidate.throughput is not None and peak is not None:
        t = candidate.throughput
        return (f"{text}: {t.samples_per_s:.2f} pairs/s, MFU {t.mfu:.1%} (DPO {t.dpo_mfu:.1%}), "
                f"peak {peak.total / GIB:.1f} GiB on stage {peak.stage}")
    return f"{text}: {'; '.join(candidate.problems)}"


def explain(result: SearchResult, top: int = 5) -> list[str]:
    """The winner, the runners-up, and the nearest layouts memory rejected."""
    lines = [f"{result.evaluated} layouts tried: {result.rule_rejected} break a rule, "
             f"{result.over_memory} do not fit, {len(result.ranked)} fit"]
    for rank, candidate in enumerate(result.ranked[:top], 1):
        lines.append(f"{rank}. {candidate_line(candidate)}")
    lines += [f"over memory: {candidate_line(c)}" for c in result.too_big]
    return lines
