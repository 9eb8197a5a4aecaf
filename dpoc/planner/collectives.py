"""The collectives one rank of the dpoc runtime issues in a step, counted call by call, and what each costs.

Every call pays the hardware's `collective_latency_us` (gloo's between processes on one host is 10 to 100 times
an accelerator link's, so on the CPU the count, not the bytes, sets the time); the bytes are charged apart
(`throughput`). Only groups of 2 or more ranks are counted: megatron-core also calls its collectives on
1-rank groups, which return at once. The counts follow what the runtime runs
(tests/runtime/test_runtime_collectives.py counts a real step's calls at dp2, tp2 and pp2):

- tensor parallelism, per layer: 2 all-reduces forward (the row-parallel outputs) and 2 backward (the
  column-parallel inputs' gradients); sequence parallel: 2 all-gathers and 2 reduce-scatters forward, and
  backward the column-parallel layers' input gathered again for their weight gradient and their input's
  gradient reduce-scattered, the row-parallel layers' output gradient gathered (6); the first stage's
  vocab-parallel embedding 1 forward (and, sequence parallel, its scatter's all-gather backward); the last
  stage's vocab-parallel cross entropy 3 forward (its max, target logit and sum of exps), its output layer 1
  backward (its input's gradient), with sequence parallelism 1 all-gather forward before the response-only
  head (`runtime/model/gpt.py`);
- pipeline parallelism, per micro-batch and neighbouring stage: each tensor a pass sends or receives (the
  policy's and the live reference's activations forward, their gradient backward) as one isend or irecv,
  preceded by one for its shape (the runtime's variable sequence lengths; not with gloo's interleaved
  pipeline, which gives every micro-batch one length);
- expert parallelism: the dispatch and combine all-to-alls per layer and pass (context parallelism's exchanges
  are `throughput.context_parallel_exposed_s`'s, which knows what of them the attention hides);
- per step: the gradients' reduce-scatter and the parameters' all-gather per DDP bucket (an all-reduce
  without the distributed optimizer) over dp * cp, and over the expert data-parallel group for routed
  experts; the gradient norm's, the step metrics' and the preemption check's all-reduce over the world (the
  runtime agrees on a SIGTERM after every step when it saves checkpoints, as every build does); with tp and
  q/k norms or sequence parallelism one all-reduce of the replicated norms' gradients; with tied embeddings
  across pp one of the embedding's gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpoc.contract.plan import HardwareSpec, Layout, ModelSpec
from dpoc.planner.workload import Workload

# megatron-core's DDP bucket (parameters) when the distributed optimizer is on: max(40M, 1M x dp)
DDP_BUCKET_PARAMS = 40_000_000
CROSS_ENTROPY_ALL_REDUCES = 3


def moved_bytes(op: str, message: float, ranks: int) -> float:
    """Bytes each rank sends for one call on `ranks` ranks of a `message`-byte buffer (an all-gather's and a
    reduce-scatter's: the whole, gathered one), as ring algorithms move them: the bus-bandwidth convention."""
    if op == "all_reduce":
        return 2 * (ranks - 1) / ranks * message
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (ranks - 1) / ranks * message
    return message  # broadcast, send / receive


@dataclass(eq=False, repr=False)  # an intermediate: not frozen, compared by identity, no repr (one method to compile)
class MicroBatchCalls:
    """Collective calls of one micro-batch through one stage, by parallelism."""

    tensor: int
    pipeline: int
    experts: int

    @property
    def total(self) -> int:
        return self.tensor + self.pipeline + self.experts


def forward_passes(workload: Workload) -> int:
    """Forward passes of a micro-batch: the policy's, and the live reference's."""
    return 1 + (1 if workload.reference_forward and workload.trains else 0)


def micro_batch_calls(model: ModelSpec, layout: Layout, workload: Workload, stage: int, layers: int,
                      backend: str, recompute_forward: bool = False) -> MicroBatchCalls:
    """Calls one rank of `stage` (holding `layers` layers) issues per micro-batch (`recompute_forward`: full
    recompute's extra forward of every layer)."""
    forwards = forward_passes(workload) + (1 if recompute_forward else 0)
    backwards = 1 if workload.trains else 0
    first, last = stage == 0, stage == layout.pp - 1
    tensor = 0
    if layout.tp > 1:
        sp = layout.sequence_parallel
        tensor = layers * (forwards * (4 if sp else 2) + backwards * (6 if sp else 2))
        heads = forward_passes(workload)  # the embedding and the head run once per forward pass, not recomputed
        if first:
            tensor += heads + (backwards if sp else 0)
        if last:
            tensor += heads * (CROSS_ENTROPY_ALL_REDUCES + (1 if layout.sequence_parallel else 0)) + backwards
    pipeline = 0
    if layout.pp > 1:
        neighbours = (0 if first else 1) + (0 if last else 1)
        shapes = 1 if backend == "gloo" and layout.vpp > 1 else 2
        pipeline = neighbours * (forward_passes(workload) + backwards) * shapes * layout.vpp
    experts = (forwards + backwards) * layers * 2 if model.moe is not None and layout.ep > 1 else 0
    return MicroBatchCalls(tensor, pipeline, experts)


def step_calls(model: ModelSpec, layout: Layout, dense_params: int, expert_params: int) -> int:
    """Calls one rank issues once per step, outside the micro-batches (its shard's `dense_params` and
    `expert_params` set the DDP buckets)."""
    calls = 0
    per_bucket = 2 if layout.distributed_optimizer else 1
    for params, group in ((dense_params, layout.dp * layout.cp), (expert_params, layout.edp)):
        if group > 1 and params:
            bucket = max(DDP_BUCKET_PARAMS, 1_000_000 * group)
            calls += per_bucket * (math.ceil(params / bucket) + layout.vpp - 1)
    if layout.world_size > 1:
        calls += 3  # the gradient norm, the step metrics, the SIGTERM agreement (every build saves checkpoints)
    if layout.tp > 1 and (model.qk_layernorm or layout.sequence_parallel):
        calls += 1
    if layout.pp > 1 and model.tie_embeddings:
        calls += 1
    return calls


def latency_s(hardware: HardwareSpec, calls: float) -> float:
    return calls * hardware.collective_latency_us * 1e-6
