"""Predicted step time, samples/s, tokens/s and MFU of a DPO (or, for calibration, a pretraining) run.

FLOPs follow Megatron's `num_floating_point_operations` convention (formulas-and-anchors §1.5): 2 FLOPs
per multiply-add, backward = 2 x forward, causal attention (half the s^2 work), MoE experts at top-k, the
router ignored. DPO per pair: policy forward + backward on chosen and rejected, and with the live reference
its forward on the same two (`workload`); full recompute adds a policy forward, selective recompute (core
attention) adds its forward. Sequence lengths come from `lengths`: the slowest data-parallel rank's expected
padded lengths (their mean for the linear terms, their mean square for attention), or packing's real
tokens. The precompute pass of precomputed reference log-probs (`predict_reference_pass`) is one forward
over the dataset, sorted by length.

Time per micro-batch and pipeline stage = compute (FLOPs / (peak x efficiency), with one efficiency for
dense GEMMs and attention and one for the routed experts' grouped GEMMs) + exposed communication: TP/SP
all-gathers and reduce-scatters, expert all-to-all, context-parallel KV exchange and pipeline send/receive.
A step is (m + (pp - 1) / vpp) x the slowest stage (1F1B with its bubble) plus the data-parallel gradient
reduce-scatter and parameter all-gather. Overlap of communication with compute is not modelled.

Ranks are placed tp innermost, then cp, then dp/ep, then pp; a group spanning more devices than a node
uses the SuperPoD fabric if it fits one, else the inter-node link.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpoc.plan import HardwareSpec, Layout, ModelSpec, Training
from dpoc.planner.lengths import Lengths
from dpoc.planner.memory import element_bytes
from dpoc.planner.packing import SEQUENCES_PER_PAIR
from dpoc.planner.params import SWIGLU_MATRICES, kv_width, q_width, real_layers_per_stage, stage_shard
from dpoc.planner.workload import DPO_LIVE, REFERENCE_PASS, Workload

COMM_EFFICIENCY = 0.7  # achieved / nominal link bandwidth (Ascend msmodeling default)
COLLECTIVE_LATENCY_S = 10e-6  # fixed cost per communication op (Ascend msmodeling static op cost)
GRAD_BYTES = 4  # bf16 training reduces gradients in fp32


@dataclass(frozen=True)
class Efficiency:
    """Achieved fraction of peak FLOPs: dense GEMMs + attention, and routed-expert grouped GEMMs."""

    dense: float
    experts: float


# `calibration.fit()` on the published non-DPO runs, rounded: what `dpoc build` / `dpoc plan` use without
# refitting at every run (and without importing the calibration set). tests/planner/test_throughput.py checks
# it against a fresh fit; `python bench/planner.py` prints the fit.
FITTED = Efficiency(dense=0.474, experts=0.167)


@dataclass(frozen=True)
class Throughput:
    step_s: float
    samples_per_s: float  # pairs/s for DPO
    tokens_per_s: float  # all sequences' real tokens (as the runtime counts them; a mean alone: padded), whole job
    mfu: float  # policy training FLOPs only (comparable to SFT/pretraining MFU)
    dpo_mfu: float  # policy + the live reference's forward (precomputed: equal to mfu)
    compute_s: float  # slowest stage, per micro-batch
    communication_s: float  # slowest stage's exposed communication, per micro-batch
    bubble_s: float
    data_parallel_s: float


def link_gbps(hardware: HardwareSpec, span: int) -> float:
    """Per-device bandwidth of a group whose ranks lie within `span` consecutive devices."""
    if span <= hardware.devices_per_node:
        return hardware.intra_node_gbps
    if hardware.superpod_nodes and span <= hardware.superpod_nodes * hardware.devices_per_node:
        return hardware.superpod_gbps
    return hardware.inter_node_gbps


def _transfer_s(hardware: HardwareSpec, span: int, nbytes: float, ops: float) -> float:
    return nbytes / (link_gbps(hardware, span) * 1e9 * COMM_EFFICIENCY) + ops * COLLECTIVE_LATENCY_S


@dataclass(frozen=True)
class _StageFlops:
    dense: float  # forward FLOPs of one micro-batch through the stage (all ranks of the stage together)
    experts: float
    attention_core: float  # part of `dense`: the s^2 term


def _stage_forward_flops(
    model: ModelSpec, layers: int, last: bool, seq: float, sequences: float, seq_square: float | None = None
) -> _StageFlops:
    """`seq`: mean tokens per sequence; `seq_square`: mean of their squares (default seq^2)."""
    h, q, kv = model.hidden_size, q_width(model), kv_width(model)
    tokens = seq * sequences
    projections = 2 * (h * (q + 2 * kv) + q * h)
    core = layers * sequences * 2 * q * (seq * seq if seq_square is None else seq_square)  # causal QK^T and AV
    moe = model.moe
    if moe is None:
        mlp, experts = 2 * SWIGLU_MATRICES * h * model.ffn_hidden_size, 0.0
    else:
        mlp = 2 * SWIGLU_MATRICES * h * moe.shared_expert_ffn_hidden_size
        experts = layers * tokens * 2 * SWIGLU_MATRICES * h * moe.ffn_hidden_size * moe.topk
    dense = layers * tokens * (projections + mlp) + core + (tokens * 2 * h * model.vocab_size if last else 0)
    return _StageFlops(dense, experts, core)


def training_flops_per_sequence(model: ModelSpec, seq: float, seq_square: float | None = None) -> float:
    """Megatron-convention FLOPs to train on one sequence (forward + backward), no recompute."""
    f = _stage_forward_flops(model, model.num_layers, True, seq, 1, seq_square)
    return 3 * (f.dense + f.experts)


@dataclass(frozen=True)
class _Run:
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
    f = _stage_forward_flops(run.model, layers, stage == layout.pp - 1, run.seq, run.sequences, run.seq_square)
    factor = (3 + (1 if run.workload.reference_forward else 0)) if run.workload.trains else 1
    dense, experts = factor * f.dense, factor * f.experts
    if layout.recompute == "full" and run.workload.trains:
        dense, experts = dense + f.dense, experts + f.experts
    elif layout.recompute == "selective" and run.workload.trains:
        dense += f.attention_core
    peak = run.hardware.peak_tflops * 1e12
    return (dense / run.efficiency.dense + experts / run.efficiency.experts) / (layout.tp * layout.cp * peak)


def _stage_comm_s(run: _Run, layers: int) -> float:
    """Exposed communication of one micro-batch through one stage."""
    layout, hw, model, passes = run.layout, run.hardware, run.model, run.passes
    whole = run.activation_bytes(run.sequences)
    sp = layout.tp if layout.sequence_parallel else 1
    local = whole / sp
    comm = 0.0
    if layout.tp > 1:  # 2 all-gathers + 2 reduce-scatters (or 2 all-reduces) per layer and pass
        ops = passes * layers * 4
        comm += _transfer_s(hw, layout.tp, ops * (layout.tp - 1) / layout.tp * whole, ops)
    if model.moe is not None and layout.ep > 1:  # dispatch + combine of the local tokens' top-k copies
        ops = passes * layers * 2
        volume = ops * model.moe.topk * local * (layout.ep - 1) / layout.ep
        comm += _transfer_s(hw, layout.etp * layout.ep, volume, ops)
    if layout.cp > 1:  # ring attention: cp - 1 KV blocks per pass, the backward also returns their gradients
        ops = (passes + 1) * layers * (layout.cp - 1)
        kv_block = whole / model.hidden_size * 2 * kv_width(model) / layout.tp
        comm += _transfer_s(hw, layout.tp * layout.cp, ops * kv_block, ops)
    if layout.pp > 1:  # the stage's input forward and its gradient backward, policy + reference together
        carried = run.activation_bytes(run.sequences * (2 if run.workload.reference_forward else 1))
        directions = 2 if run.workload.trains else 1
        comm += _transfer_s(hw, hw.world_size, directions * carried / sp, directions)
    return comm


def predict(
    model: ModelSpec, hardware: HardwareSpec, layout: Layout, training: Training, efficiency: Efficiency,
    lengths: Lengths, workload: Workload = DPO_LIVE,
) -> Throughput:
    """Throughput of `layout` with sequences as `lengths` says: padded micro-batches at the slowest rank's
    expected lengths, or packed streams computing their real tokens (attention per sequence)."""
    real, real_square = lengths.sequence_moments()
    if training.packing and workload.pairwise:
        steps = lengths.packed(layout, training)
        seq, seq_square, micro_batches = real, real_square, steps.micro_batches
        sequences = SEQUENCES_PER_PAIR * steps.pairs_per_micro_batch
        if not training.dynamic_padding:  # the stream is padded to its budget: every budget token is computed
            sequences = steps.budget / seq
        step_mean, step_square = seq, seq_square
    else:
        rows = lengths.micro_batches(layout, training)
        seq, seq_square, micro_batches = rows.mean, rows.mean_square, layout.num_microbatches
        sequences = workload.sequences_per_sample * layout.micro_batch_size
        step_mean, step_square = rows.step_mean, rows.step_square
    run = _Run(model, hardware, layout, training, efficiency, workload, seq, seq_square, sequences, micro_batches)
    slowest, compute_s, comm_s = _slowest_stage(run)
    bubble = (layout.pp - 1) / layout.vpp * slowest
    data_parallel = _data_parallel_s(model, hardware, layout, training, real_layers_per_stage(layout))
    step = micro_batches * slowest + bubble + data_parallel
    seqs = layout.global_batch_size * workload.sequences_per_sample
    policy_flops = seqs * training_flops_per_sequence(model, step_mean, step_square)
    reference_flops = policy_flops / 3 if workload.reference_forward else 0.0  # its forward, in every step
    capacity = step * hardware.world_size * hardware.peak_tflops * 1e12
    return Throughput(
        step_s=step, samples_per_s=layout.global_batch_size / step,
        tokens_per_s=seqs * real / step,
        mfu=policy_flops / capacity, dpo_mfu=(policy_flops + reference_flops) / capacity,
        compute_s=compute_s, communication_s=comm_s, bubble_s=bubble, data_parallel_s=data_parallel,
    )


def _slowest_stage(run: _Run) -> tuple[float, float, float]:
    """(time, compute, communication) of one micro-batch through the slowest pipeline stage. A stage's time
    depends only on its layer count and on holding the output layer (the last stage)."""
    layout = run.layout
    layer_list = real_layers_per_stage(layout)
    representatives = {layers: stage for stage, layers in enumerate(layer_list[:-1])}
    stages = []
    for stage in {*representatives.values(), layout.pp - 1}:
        compute, comm = _stage_compute_s(run, stage, layer_list[stage]), _stage_comm_s(run, layer_list[stage])
        stages.append((compute + comm, compute, comm))
    return max(stages)


@dataclass(frozen=True)
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
               SEQUENCES_PER_PAIR * micro_batch, round_micro_batches)
    slowest, _, _ = _slowest_stage(run)
    round_s = round_micro_batches * slowest + (layout.pp - 1) / layout.vpp * slowest
    pairs_per_s = layout.dp * round_micro_batches * micro_batch / round_s
    seconds = lengths.pairs / pairs_per_s if lengths.pairs is not None else None
    return ReferencePass(micro_batch, pairs_per_s, seconds)


def _data_parallel_s(
    model: ModelSpec, hardware: HardwareSpec, layout: Layout, training: Training, layer_list: tuple[int, ...]
) -> float:
    """Gradient reduce-scatter + parameter all-gather (distributed optimizer) or all-reduce, per step, of the
    largest stage: the first, the last, or the middle one with the most layers (middle stages differ only in
    their layer count)."""
    last = len(layer_list) - 1
    candidates = {0: layer_list[0], last: layer_list[last]}
    if last > 1:
        candidates[1] = max(layer_list[1:-1])
    shard = max((stage_shard(model, layout, s, n) for s, n in candidates.items()), key=lambda x: x.total)
    per_param = GRAD_BYTES + element_bytes(training) if layout.distributed_optimizer else 2 * GRAD_BYTES
    span = hardware.world_size // layout.pp
    total = 0.0
    for params, group in ((shard.dense, layout.dp * layout.cp), (shard.experts, layout.edp)):
        if group > 1 and params:
            total += _transfer_s(hardware, span, params * per_param * (group - 1) / group, 2)
    return total
