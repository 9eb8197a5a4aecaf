"""The planner's figures for the layer the device self-check runs (`dpoc preflight BUILD --device`), so the
check can print what it measured beside what the plan assumed.

The check builds the plan's model with one transformer layer (its embedding, final norm and output layer
too), sharded as `contract.check_group` says, and runs one micro-batch (2 x micro_batch_size sequences of
seq_length tokens, no reference) forward and backward and one optimizer step. The estimate is the planner's
own model of exactly that job, through the functions every plan uses (`memory.estimate_memory`,
`throughput.predict`): the plan's model at one layer, a one-node cluster of the group's processes, the plan's
layout knobs at the group's tp / ep / etp, no pipeline or context parallelism, one micro-batch per rank, the
precomputed-reference workload (the policy alone trains), every micro-batch `seq_length` long.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from dpoc.contract.check_group import CheckGroup
from dpoc.contract.plan import ModelSpec, Training
from dpoc.contract.specs import hardware_spec
from dpoc.planner.features import DPOC_CPU
from dpoc.planner.layout import make_layout
from dpoc.planner.lengths import MeanLength
from dpoc.planner.memory import estimate_memory
from dpoc.planner.report import summary_traits
from dpoc.planner.throughput import FITTED, Efficiency, predict
from dpoc.planner.workload import DPO_PRECOMPUTED

# the plan's layout knobs the checked layer keeps (its parallel sizes are the group's)
KEPT_KNOBS = ("micro_batch_size", "recompute", "recompute_method", "recompute_num_layers", "distributed_optimizer",
              "moe_dispatcher", "moe_grouped_gemm")


@dataclass(frozen=True)
class LayerEstimate:
    """One rank of the checked one-layer job, as the planner models it."""

    held_bytes: float  # static state (weights, gradients, optimizer), saved activations and logits
    peak_bytes: float  # held, plus the transient working set: where a device allocator peaks
    step_s: float  # the micro-batch's forward and backward and the optimizer step


def estimate(plan: dict[str, Any], group: CheckGroup) -> LayerEstimate:
    """The planner's figures for the device check of the build whose plan.json is `plan`."""
    m = plan["model"]
    model = ModelSpec.of(m, name=m["name"], family=m["family"], mindspeed_name=m["mindspeed_name"],
                         converter=m["converter"], hf_model_type=m["hf_model_type"])
    moe = replace(model.moe, num_experts=group.num_experts) if model.moe is not None else None
    model = replace(model, num_layers=1, moe=moe)
    node = replace(hardware_spec(plan["hardware"]["name"], plan["hardware"]), nodes=1,
                   devices_per_node=group.processes)
    knobs = {key: plan["layout"][key] for key in KEPT_KNOBS}
    knobs.update(tp=group.tp, ep=group.ep, etp=group.etp,
                 sequence_parallel=plan["layout"]["sequence_parallel"] and group.tp > 1)
    layout = make_layout(model, node, knobs["micro_batch_size"] * group.processes // group.tp, knobs)
    training = replace(Training(**plan["training"]), packing=False)
    lengths = MeanLength(training.seq_length)
    summary = (plan.get("estimate") or {}).get("target") or {}
    traits = summary_traits(summary) if summary else DPOC_CPU
    stage = estimate_memory(model, node, layout, training, lengths, DPO_PRECOMPUTED, traits=traits).peak
    fitted = (plan.get("estimate") or {}).get("efficiency")
    efficiency = Efficiency(**fitted) if fitted else FITTED
    step = predict(model, node, layout, training, efficiency, lengths, DPO_PRECOMPUTED, traits)
    held = stage.static + stage.activations + stage.pipeline_buffers + stage.logits
    return LayerEstimate(held_bytes=held, peak_bytes=held + stage.transient, step_s=step.step_s)
