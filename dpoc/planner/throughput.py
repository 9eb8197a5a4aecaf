"""Predicted step time, samples/s, tokens/s and MFU of a DPO (or, for calibration, a pretraining) run.

FLOPs follow Megatron's `num_floating_point_operations` convention (formulas-and-anchors §1.5): 2 FLOPs
per multiply-add, backward = 2 x forward, causal attention (half the s^2 work), MoE experts at top-k, the
router ignored. DPO per pair: policy forward + backward on chosen and rejected, and with the live reference
its forward on the same two (`workload`); full recompute adds a policy forward, selective recompute (core
attention) adds its forward. The time counts the LM head over the positions the dpoc runtime runs it on (the
response tokens, when the dataset's stats say how many: `head`); MFU keeps the convention's full head.
Sequence lengths come from `lengths`: the slowest data-parallel rank's expected
padded lengths (their mean for the linear terms, their mean square for attention), or packing's real
tokens. The precompute pass of precomputed reference log-probs (`predict_reference_pass`) is one forward
over the dataset, sorted by length.

Time per micro-batch and pipeline stage = compute (FLOPs / (peak x efficiency), with one efficiency for
dense GEMMs and attention and one for the routed experts' grouped GEMMs) + exposed communication: TP/SP
all-gathers and reduce-scatters, expert all-to-all, context-parallel KV exchange and pipeline send/receive:
their bytes over the link, and the hardware's `collective_latency_us` per call the runtime issues
(`collectives`). A step is (m + (pp - 1) / vpp) x the slowest stage (1F1B with its bubble) plus the
data-parallel gradient reduce-scatter and parameter all-gather and the step's other collectives (gradient
norm, metrics). Overlap of communication with compute is not modelled.

Ranks are placed tp innermost, then cp, then dp/ep, then pp; a group spanning more devices than a node
uses the SuperPoD fabric if it fits one, else the inter-node link.

Latency: every kernel call also costs a fixed `op_latency_us` (the hardware preset's: dispatch and launch,
whatever its FLOPs; what dominates a tiny model's step), added to the compute (launches overlapping compute
on an accelerator are not modelled, as overlapping communication is not). A stage's forward pass makes
`layer_forward_calls` calls per layer (norms, projections, q/k norms, rotary, core attention, the MLP or the
routed experts, residual adds), plus the embedding on the first stage and the output layer, cross entropy
and DPO loss on the last (`EMBEDDING_CALLS`, `HEAD_CALLS`, `DPO_LOSS_CALLS`); a backward makes
`BACKWARD_CALLS_PER_FORWARD_CALL` calls per forward call; every forward pass of the step (policy, live
reference, full recompute; selective recompute: the core attention) pays its calls. Once per step the
optimizer costs the preset's `optimizer_tensor_us` per parameter tensor of the rank's shard (its update,
gradient norm and clipping are per-tensor calls of their own, not the layers' module calls) and sweeps
`OPTIMIZER_BYTES_PER_PARAM` per parameter at the preset's `memory_gbps`. The counts are the layer
structure's (what a device with fused norm, rotary, attention and SwiGLU kernels launches); the CPU preset's
constants are measured against them (`bench/cpu_constants.py`), which also prints what its runs imply for
the backward and the output layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dpoc.contract.lora import Lora
from dpoc.contract.plan import HardwareSpec, Layout, ModelSpec, Training
from dpoc.planner import collectives
from dpoc.planner import lora as adapters
from dpoc.planner.features import DPOC_CPU, Traits
from dpoc.planner.head import head_fraction
from dpoc.planner.lengths import Lengths
from dpoc.planner.memory import element_bytes
from dpoc.planner.packing import SEQUENCES_PER_PAIR
from dpoc.planner.params import (
    Shard,
    attention_projection_params,
    kv_width,
    mlp_params,
    q_width,
    real_layers_per_stage,
    stage_shard,
    stage_tensors,
)
from dpoc.planner.workload import DPO_LIVE, REFERENCE_PASS, Workload

COMM_EFFICIENCY = 0.7  # achieved / nominal link bandwidth (Ascend msmodeling default)
GRAD_BYTES = 4  # bf16 training reduces gradients in fp32
BACKWARD_CALLS_PER_FORWARD_CALL = 1  # autograd runs one backward node per forward call
# Adam over fp32 main parameters: read the parameter, gradient and both moments, write the parameter and both
# moments (28 B); the gradient norm reads the gradient (4 B) and clipping rewrites it (8 B)
OPTIMIZER_BYTES_PER_PARAM = 40
EMBEDDING_CALLS = 1
# the last stage's output: final norm, output projection, and megatron's vocab-parallel cross entropy (max,
# subtract, target mask and gather, exp, sum, log, difference: 10; its all-reduces are communication)
HEAD_CALLS = 1 + 1 + 10
# the DPO loss from per-token log-probs: masked sums of both sides, log-ratios, log-sigmoid, mean, and the
# logged rewards, margins and accuracies
DPO_LOSS_CALLS = 15


def layer_forward_calls(model: ModelSpec, layout: Layout) -> int:
    """Kernel calls of one transformer layer's forward: attention (input norm, QKV projection, q/k norms,
    rotary on q and k, core attention, output projection, residual add) and the MLP (pre-MLP norm, then the
    dense SwiGLU's gate/up projection, activation and down projection; or the router's projection, softmax
    and top-k, token permutation, a grouped GEMM pair and activation or each local expert's three calls,
    unpermutation and the shared expert's three calls; residual add)."""
    attention = 1 + 1 + (2 if model.qk_layernorm else 0) + 2 + 1 + 1 + 1
    moe = model.moe
    if moe is None:
        return attention + 1 + 3 + 1
    experts = 3 if layout.moe_grouped_gemm else 3 * (moe.num_experts // layout.ep)
    shared = 3 if moe.shared_expert_ffn_hidden_size else 0
    return attention + 1 + 3 + 1 + experts + 1 + shared + 1


def stage_forward_calls(model: ModelSpec, layout: Layout, stage: int, layers: int, loss: bool) -> int:
    """Kernel calls of one forward pass of a micro-batch through `stage` (`loss`: the DPO loss follows)."""
    calls = layers * layer_forward_calls(model, layout)
    if stage == 0:
        calls += EMBEDDING_CALLS
    if stage == layout.pp - 1:
        calls += HEAD_CALLS + (DPO_LOSS_CALLS if loss else 0)
    return calls


@dataclass(frozen=True)
class Efficiency:
    """Achieved fraction of peak FLOPs: dense GEMMs + attention, and routed-expert grouped GEMMs."""

    dense: float
    experts: float


# `calibration.fit()` on the published non-DPO runs (their presets' per-call latency included), rounded: what
# `dpoc build` / `dpoc plan` use without refitting at every run (and without importing the calibration set).
# tests/planner/test_throughput.py checks it against a fresh fit; `python bench/planner.py` prints the fit.
FITTED = Efficiency(dense=0.4762, experts=0.1691)


@dataclass(eq=False, repr=False)  # a result: not frozen, compared by identity, no repr (one method to compile)
class Throughput:
    """The predicted step time and rates of one layout."""
    step_s: float
    samples_per_s: float  # pairs/s for DPO
    tokens_per_s: float  # all sequences' real tokens (as the runtime counts them; a mean alone: padded), whole job
    mfu: float  # policy training FLOPs only (comparable to SFT/pretraining MFU)
    dpo_mfu: float  # policy + the live reference's forward (precomputed: equal to mfu)
    compute_s: float  # slowest stage, per micro-batch
    communication_s: float  # slowest stage's exposed communication, per micro-batch
    latency_s: float  # slowest stage's fixed per-call cost, per micro-batch
    bubble_s: float
    data_parallel_s: float  # per step: the gradients' and parameters' collectives and the step's others
    optimizer_s: float  # per step: its calls and its sweep over the rank's shard
    micro_batches: float  # per data-parallel rank and step

    def shares(self) -> dict[str, float]:
        """Fractions of the step: FLOPs, per-call latency, communication (incl. data-parallel), the optimizer
        step, the pipeline bubble."""
        parts = {"compute": self.micro_batches * self.compute_s, "latency": self.micro_batches * self.latency_s,
                 "communication": self.micro_batches * self.communication_s + self.data_parallel_s,
                 "optimizer": self.optimizer_s, "bubble": self.bubble_s}
        return {name: value / self.step_s for name, value in parts.items()}


def link_gbps(hardware: HardwareSpec, span: int) -> float:
    """Per-device bandwidth of a group whose ranks lie within `span` consecutive devices."""
    if span <= hardware.devices_per_node:
        return hardware.intra_node_gbps
    if hardware.superpod_nodes and span <= hardware.superpod_nodes * hardware.devices_per_node:
        return hardware.superpod_gbps
    return hardware.inter_node_gbps


def _transfer_s(hardware: HardwareSpec, span: int, nbytes: float) -> float:
    """The bytes' time on the link (each call's fixed cost is `collectives.latency_s`'s)."""
    return nbytes / (link_gbps(hardware, span) * 1e9 * COMM_EFFICIENCY)


@dataclass(eq=False, repr=False)  # an intermediate: not frozen, compared by identity, no repr (one method to compile)
class _StageFlops:
    """Forward FLOPs of one micro-batch through one stage."""
    dense: float  # forward FLOPs of one micro-batch through the stage (all ranks of the stage together)
    experts: float
    attention_core: float  # part of `dense`: the s^2 term
    adapters: float = 0.0  # LoRA's adapters (dense and expert ones), not part of `dense` or `experts`


def _stage_forward_flops(
    model: ModelSpec, layers: int, last: bool, seq: float, sequences: float, seq_square: float | None = None,
    lora: Lora | None = None,
    head: float = 1.0,
) -> _StageFlops:
    """`seq`: mean tokens per sequence; `seq_square`: mean of their squares (default seq^2); `head`: the share
    of the positions the LM head runs on (the dpoc runtime's: the response tokens, `head.head_fraction`)."""
    h, q = model.hidden_size, q_width(model)
    tokens = seq * sequences
    projections = 2 * attention_projection_params(model)
    core = layers * sequences * 2 * q * (seq * seq if seq_square is None else seq_square)  # causal QK^T and AV
    moe = model.moe
    if moe is None:
        mlp, experts = 2 * mlp_params(h, model.ffn_hidden_size), 0.0
    else:
        mlp = 2 * mlp_params(h, moe.shared_expert_ffn_hidden_size)
        experts = layers * tokens * 2 * mlp_params(h, moe.ffn_hidden_size) * moe.topk
    dense = layers * tokens * (projections + mlp) + core + (head * tokens * 2 * h * model.vocab_size if last else 0)
    adapter = layers * sum(adapters.adapter_forward_flops(model, lora, tokens)) if lora is not None else 0.0
    return _StageFlops(dense, experts, core, adapter)


def _trained_flops(f: _StageFlops, lora: Lora | None) -> tuple[float, float]:
    """(dense, experts) FLOPs of a forward and backward over `f`. Full training: backward = 2 x forward (input
    and weight gradients). LoRA: the frozen linears' backward computes only the input gradient (1 x), core
    attention (no weights) still 2 x, and the adapters train in full (3 x, counted as dense)."""
    if lora is None:
        return 3 * f.dense, 3 * f.experts
    return 2 * f.dense + f.attention_core + 3 * f.adapters, 2 * f.experts


def training_flops_per_sequence(model: ModelSpec, seq: float, seq_square: float | None = None,
                                lora: Lora | None = None) -> float:
    """Megatron-convention FLOPs to train on one sequence (forward + backward), no recompute: the head over
    every position, as MFU counts it, whatever positions the runtime runs it on; under LoRA the FLOPs LoRA
    training runs (no weight gradients of the frozen base)."""
    return sum(_trained_flops(_stage_forward_flops(model, model.num_layers, True, seq, 1, seq_square, lora), lora))


def forward_flops_per_sequence(model: ModelSpec, seq: float, seq_square: float | None = None) -> float:
    """The base model's forward over one sequence: the live reference's work (under LoRA: adapters off)."""
    f = _stage_forward_flops(model, model.num_layers, True, seq, 1, seq_square)
    return f.dense + f.experts


@dataclass(eq=False, repr=False)  # an intermediate: not frozen, compared by identity, no repr (one method to compile)
class _Run:
    """Everything one prediction reads."""
    model: ModelSpec
    hardware: HardwareSpec
    layout: Layout
    training: Training
    efficiency: Efficiency
    workload: Workload
    seq: float  # tokens per sequence
    seq_square: float  # mean square of the sequences' lengths
    sequences: float  # sequences one micro-batch trains on (packing: on average)
    micro_batches: float  # per data-parallel rank and step
    head: float = 1.0  # share of the positions the LM head runs on

    @property
    def passes(self) -> int:
        """Passes through each layer per micro-batch: policy forward and backward, recompute, reference."""
        if not self.workload.trains:
            return 1
        recompute = 1 if self.layout.recompute == "full" else 0
        return 2 + recompute + (1 if self.workload.reference_forward else 0)

    def activation_bytes(self, sequences: float) -> float:
        """One [s / cp, sequences, h] activation, whole (not sequence-parallel sharded)."""
        a = element_bytes(self.training)
        return self.seq * sequences / self.layout.cp * self.model.hidden_size * a


def _stage_compute_s(run: _Run, stage: int, layers: int) -> float:
    layout = run.layout
    f = _stage_forward_flops(run.model, layers, stage == layout.pp - 1, run.seq, run.sequences, run.seq_square,
                             run.workload.lora if run.workload.trains else None, run.head)
    lora = run.workload.lora
    if run.workload.trains:
        dense, experts = _trained_flops(f, lora)
        if run.workload.reference_forward:
            dense, experts = dense + f.dense, experts + f.experts
    else:
        dense, experts = f.dense, f.experts
    if layout.recompute == "full" and run.workload.trains:
        dense, experts = dense + f.dense + f.adapters, experts + f.experts
    elif layout.recompute == "selective" and run.workload.trains:
        dense += f.attention_core
    peak = run.hardware.peak_tflops * 1e12
    return (dense / run.efficiency.dense + experts / run.efficiency.experts) / (layout.tp * layout.cp * peak)


def _stage_comm_s(run: _Run, stage: int, layers: int) -> float:
    """Exposed communication of one micro-batch through one stage: bytes, and each call's fixed cost."""
    layout, hw, model, passes = run.layout, run.hardware, run.model, run.passes
    whole = run.activation_bytes(run.sequences)
    sp = layout.tp if layout.sequence_parallel else 1
    local = whole / sp
    comm = 0.0
    if layout.tp > 1:  # 2 all-gathers + 2 reduce-scatters (or 2 all-reduces) per layer and pass
        comm += _transfer_s(hw, layout.tp, passes * layers * 4 * (layout.tp - 1) / layout.tp * whole)
    if model.moe is not None and layout.ep > 1:  # dispatch + combine of the local tokens' top-k copies
        volume = passes * layers * 2 * model.moe.topk * local * (layout.ep - 1) / layout.ep
        comm += _transfer_s(hw, layout.etp * layout.ep, volume)
    comm += context_parallel_exposed_s(run, layers)
    if layout.pp > 1:  # the stage's input forward and its gradient backward, policy + reference together
        carried = run.activation_bytes(run.sequences * (2 if run.workload.reference_forward else 1))
        directions = 2 if run.workload.trains else 1
        comm += _transfer_s(hw, hw.world_size, directions * carried / sp)
    calls = collectives.micro_batch_calls(model, layout, run.workload, stage, layers, hw.backend,
                                          recompute_forward=layout.recompute == "full" and run.workload.trains)
    return comm + collectives.latency_s(hw, calls.total)


def predict(
    model: ModelSpec, hardware: HardwareSpec, layout: Layout, training: Training, efficiency: Efficiency,
    lengths: Lengths, workload: Workload = DPO_LIVE, traits: Traits = DPOC_CPU,
) -> Throughput:
    """Throughput of `layout` with sequences as `lengths` says: padded micro-batches at the slowest rank's
    expected lengths as the target batches (`traits.batching`), or packed streams computing their real tokens
    (attention per sequence); the LM head over the positions the target runs it on (`traits.response_head`)."""
    real, real_square = lengths.sequence_moments()
    if training.packing and workload.pairwise:
        steps = lengths.packed(layout, training)
        seq, seq_square, micro_batches = real, real_square, steps.micro_batches
        sequences = SEQUENCES_PER_PAIR * steps.pairs_per_micro_batch
        if not training.dynamic_padding:  # the stream is padded to its budget: every budget token is computed
            sequences = steps.budget / seq
        step_mean, step_square = seq, seq_square
    else:
        rows = lengths.micro_batches(layout, training, traits.batching)
        seq, seq_square, micro_batches = rows.mean, rows.mean_square, layout.num_microbatches
        sequences = workload.sequences_per_sample * layout.micro_batch_size
        step_mean, step_square = rows.step_mean, rows.step_square
    run = _Run(model, hardware, layout, training, efficiency, workload, seq, seq_square, sequences, micro_batches,
               head_fraction(lengths, training, seq, traits.response_head))
    slowest, compute_s, comm_s, latency_s = _slowest_stage(run)
    bubble = (layout.pp - 1) / layout.vpp * slowest
    stage, layers = _largest_stage(model, layout)
    shard, tensors = stage_shard(model, layout, stage, layers), stage_tensors(model, layout, stage, layers)
    if workload.lora is not None:  # only the adapters have gradients to reduce and state to update
        lora = workload.lora
        shard = adapters.stage_adapters(model, layout, lora, layers)
        tensors = adapters.stage_adapters(model, layout, lora, layers, tensors=True)
    data_parallel = _data_parallel_s(hardware, layout, training, shard) + collectives.latency_s(
        hardware, collectives.step_calls(model, layout, shard.dense, shard.experts))
    optimizer = _optimizer_s(hardware, layout, shard, tensors)
    step = micro_batches * slowest + bubble + data_parallel + optimizer
    seqs = layout.global_batch_size * workload.sequences_per_sample
    policy_flops = seqs * training_flops_per_sequence(model, step_mean, step_square, workload.lora)
    reference_flops = seqs * forward_flops_per_sequence(model, step_mean, step_square) \
        if workload.reference_forward else 0.0  # its forward, in every step
    capacity = step * hardware.world_size * hardware.peak_tflops * 1e12
    return Throughput(
        step_s=step, samples_per_s=layout.global_batch_size / step,
        tokens_per_s=seqs * real / step,
        mfu=policy_flops / capacity, dpo_mfu=(policy_flops + reference_flops) / capacity,
        compute_s=compute_s, communication_s=comm_s, latency_s=latency_s, bubble_s=bubble,
        data_parallel_s=data_parallel, optimizer_s=optimizer, micro_batches=micro_batches,
    )


def context_parallel_exposed_s(run: _Run, layers: int) -> float:
    """Context parallelism's exchange through one stage per micro-batch, as far as it is not hidden.

    Ring (`cp_algo: ring`): each pass sends cp - 1 blocks of the rank's keys and values around the group (the
    backward also returns their gradients: one pass more); each block's transfer runs while the previous
    block's attention computes (MindSpeed's and megatron-core's ring attention post the send/receive first), so
    only what exceeds the attention core's time is exposed. Ulysses: an all-to-all of q, k, v before the core
    and of its output after, in every pass, (cp - 1) / cp of them leaving the rank; nothing to overlap with."""
    layout, model, hw = run.layout, run.model, run.hardware
    if layout.cp == 1:
        return 0.0
    tokens = run.activation_bytes(run.sequences) / model.hidden_size / layout.tp  # bytes per width unit
    span = layout.tp * layout.cp
    if layout.cp_algo == "ulysses":
        ops = run.passes * layers * 2
        width = 2 * q_width(model) + 2 * kv_width(model)  # q, k, v in; the output back
        volume = run.passes * layers * tokens * width * (layout.cp - 1) / layout.cp
        return _transfer_s(hw, span, volume) + collectives.latency_s(hw, ops)
    ops = (run.passes + 1) * layers * (layout.cp - 1)
    exchange = _transfer_s(hw, span, ops * tokens * 2 * kv_width(model)) + collectives.latency_s(hw, ops)
    f = _stage_forward_flops(model, layers, False, run.seq, run.sequences, run.seq_square)
    core = run.passes * f.attention_core / run.efficiency.dense / (span * hw.peak_tflops * 1e12)
    return max(0.0, exchange - core)


def _slowest_stage(run: _Run) -> tuple[float, float, float, float]:
    """(time, compute, communication, latency) of one micro-batch through the slowest pipeline stage. A
    stage's time depends only on its layer count and on holding the embedding (the first stage) or the output
    layer (the last)."""
    layout = run.layout
    layer_list = real_layers_per_stage(layout)
    representatives = {layers: stage for stage, layers in enumerate(layer_list[1:-1], 1)}
    stages = []
    for stage in {0, *representatives.values(), layout.pp - 1}:
        layers = layer_list[stage]
        compute, comm = _stage_compute_s(run, stage, layers), _stage_comm_s(run, stage, layers)
        latency = _stage_latency_s(run, stage, layers)
        stages.append((compute + comm + latency, compute, comm, latency))
    return max(stages)


def _stage_latency_s(run: _Run, stage: int, layers: int) -> float:
    """The fixed per-call cost of one micro-batch through one stage: the policy's forward (with the DPO loss
    on the last stage) and backward, the live reference's forward, and the recomputed forward."""
    model, layout = run.model, run.layout
    if not run.workload.trains:
        calls = stage_forward_calls(model, layout, stage, layers, loss=False)
    else:
        lora = run.workload.lora
        adapter = layers * adapters.ADAPTER_CALLS * _adapter_count(model, layout, lora) if lora is not None else 0
        policy = stage_forward_calls(model, layout, stage, layers, loss=True) + adapter
        calls = (1 + BACKWARD_CALLS_PER_FORWARD_CALL) * policy
        if run.workload.reference_forward:  # under LoRA: the base, adapters off
            calls += stage_forward_calls(model, layout, stage, layers, loss=False)
        if layout.recompute == "full":
            calls += layers * layer_forward_calls(model, layout) + adapter
        elif layout.recompute == "selective":
            calls += layers  # the core attention
    return calls * run.hardware.op_latency_us * 1e-6


def _adapter_count(model: ModelSpec, layout: Layout, lora: Lora) -> int:
    """Adapters one layer's forward calls: each adapted linear once, an expert linear once per local expert
    unless a grouped GEMM runs them together."""
    return sum(1 if not linear.expert or layout.moe_grouped_gemm else model.num_experts // layout.ep
               for linear in adapters.adapted_linears(model, lora))


@dataclass(eq=False, repr=False)  # a result: not frozen, compared by identity, no repr (one method to compile)
class ReferencePass:
    """The precompute pass of precomputed reference log-probs: one forward over the dataset."""

    micro_batch_size: int  # pairs per forward
    pairs_per_s: float
    seconds: float | None  # the whole dataset, when its size is known


def predict_reference_pass(
    model: ModelSpec, hardware: HardwareSpec, layout: Layout, training: Training, efficiency: Efficiency,
    lengths: Lengths, micro_batch: int, round_micro_batches: int,
) -> ReferencePass:
    """The pass at `layout`'s parallelism with `micro_batch` pairs per forward: the dataset sorted by length
    (little padding), `round_micro_batches` micro-batches per rank through the pipeline at a time (each round
    pays the pipeline's fill), no optimizer and no data-parallel communication."""
    seq, seq_square = lengths.sorted_dataset(layout.tp * layout.cp)
    run = _Run(model, hardware, layout, training, efficiency, REFERENCE_PASS, seq, seq_square,
               SEQUENCES_PER_PAIR * micro_batch, round_micro_batches,
               # the pass is the dpoc runtime's (precomputed log-probs): its response-only head
               head_fraction(lengths, replace(training, dynamic_padding=True), seq, response_head=True))
    slowest = _slowest_stage(run)[0]
    round_s = round_micro_batches * slowest + (layout.pp - 1) / layout.vpp * slowest
    pairs_per_s = layout.dp * round_micro_batches * micro_batch / round_s
    seconds = lengths.pairs / pairs_per_s if lengths.pairs is not None else None
    return ReferencePass(micro_batch, pairs_per_s, seconds)


def _largest_stage(model: ModelSpec, layout: Layout) -> tuple[int, int]:
    """(stage, real layers) of the pipeline stage whose ranks hold the most parameters: the first, the last,
    or the middle one with the most layers (middle stages differ only in their layer count)."""
    layer_list = real_layers_per_stage(layout)
    last = len(layer_list) - 1
    candidates = {0, last}
    if last > 1:
        candidates.add(max(range(1, last), key=lambda s: layer_list[s]))
    stage = max(sorted(candidates), key=lambda s: stage_shard(model, layout, s, layer_list[s]).total)
    return stage, layer_list[stage]


def _data_parallel_s(hardware: HardwareSpec, layout: Layout, training: Training, shard: Shard) -> float:
    """The bytes of the gradient reduce-scatter + parameter all-gather (distributed optimizer) or all-reduce,
    per step, of the largest stage's parameters (their calls' fixed cost: `collectives.step_calls`)."""
    per_param = GRAD_BYTES + element_bytes(training) if layout.distributed_optimizer else 2 * GRAD_BYTES
    span = hardware.world_size // layout.pp
    total = 0.0
    for params, group in ((shard.dense, layout.dp * layout.cp), (shard.experts, layout.edp)):
        if group > 1 and params:
            total += _transfer_s(hardware, span, params * per_param * (group - 1) / group)
    return total


def _optimizer_s(hardware: HardwareSpec, layout: Layout, shard: Shard, tensors: Shard) -> float:
    """The optimizer step on the largest stage's rank: its fixed cost per parameter tensor and its sweep over
    the parameters it updates; the distributed optimizer updates 1 / (its group) of each."""
    dense_group, expert_group = (layout.dp * layout.cp, layout.edp) if layout.distributed_optimizer else (1, 1)
    updated = tensors.dense / dense_group + tensors.experts / expert_group
    params = shard.dense / dense_group + shard.experts / expert_group
    return (updated * hardware.optimizer_tensor_us * 1e-6
            + params * OPTIMIZER_BYTES_PER_PARAM / (hardware.memory_gbps * 1e9))
