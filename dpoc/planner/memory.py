"""Per-device memory of a DPO run, per pipeline stage: static state, activations, buffers and reserve.

Static part (formulas-and-anchors §1.3, hardware-and-models §7): bf16 weights 2 B, fp32 main gradients 4 B,
fp32 master + Adam m + v 12 B (8 B in fp32 training, where the weights are the master copy), the optimizer
state sharded over dp * cp for dense parameters and over the expert data-parallel group for routed experts
when the distributed optimizer is on; the frozen reference (live, `workload.DPO_LIVE`) holds weights only,
with the policy's sharding; with precomputed reference log-probs there is none.

Activations: bytes autograd keeps per layer for the policy's 2 * mbs sequences (chosen + rejected) with flash
attention (no s^2 term, so selective recompute of core attention saves nothing), SwiGLU, GQA with q != h,
qk-norm, sequence and context parallelism and MoE top-k routing; times the micro-batches a 1F1B stage holds
(pp - stage, or the interleaved warm-up count), each at its expected length (`lengths`: the first one held at
the longest a micro-batch can be). On top: the pipeline's received tensors ([s, 4 * mbs, h] with the live
reference's hidden states, else [s, 2 * mbs, h]), the last stage's logits over the positions its LM head runs
on (the response tokens, when the dataset's stats say how many: `head`), one transient working set (the
live reference's forward through a layer or, on the last stage, its logits; a recomputed layer; the MoE
dispatch buffers), 2 x HCCL_BUFFSIZE per communicator, and the hardware's runtime reserve. Transients are
added to the held memory, not overlapped (an upper bound). The precompute pass (`reference_pass_memory`)
holds weights, one layer's working set, its logits and the pipeline's in-flight tensors: nothing for backward.

LoRA (`planner/lora.py`): the frozen base at training precision with no gradients or optimizer state; the
adapters' weights, fp32 gradients and optimizer state (sharded as dense or expert state); no reference copy
(its forward is the base's); the activations without the inputs only a frozen weight's gradient would need,
with what the adapters save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

from dpoc.contract.lora import Lora
from dpoc.contract.plan import HardwareSpec, Layout, ModelSpec, Training
from dpoc.planner import lora as adapters
from dpoc.planner.features import DPOC_CPU, NO_FEATURES, MemoryFeatures, Traits
from dpoc.planner.head import head_fraction
from dpoc.planner.lengths import Lengths, MeanLength, MicroBatchLengths
from dpoc.planner.packing import SEQUENCES_PER_PAIR
from dpoc.planner.params import Shard, kv_width, q_width, real_layers_per_stage, stage_shard
from dpoc.planner.workload import DPO_LIVE, REFERENCE_PASS, Workload

GIB = 2**30
MIB = 2**20
FP32 = 4


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one device of a pipeline stage."""

    stage: int
    layers: int  # transformer layers with weights
    params: int  # policy parameters on this device (under LoRA: the frozen base's and the adapters')
    weights: float
    gradients: float
    optimizer: float
    reference: float
    activations: float
    pipeline_buffers: float
    logits: float
    transient: float
    comm_buffers: float
    reserve: float

    @property
    def static(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.reference

    @property
    def total(self) -> float:
        dynamic = self.activations + self.pipeline_buffers + self.logits + self.transient
        return self.static + dynamic + self.comm_buffers + self.reserve


@dataclass(eq=False, repr=False)  # a result: not frozen, compared by identity, no repr (one method to compile)
class MemoryEstimate:
    """The predicted memory of each pipeline stage against the device's capacity."""
    stages: tuple[StageMemory, ...]
    capacity: float  # bytes of device memory

    @cached_property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def fits(self) -> bool:
        """The one threshold: `dpoc plan` ranks, counts and labels every layout by it, the recipe's own too."""
        return self.peak.total <= self.capacity

    def need_text(self) -> str:
        """`stage 3 needs 64.2 GiB of 64 GiB (+0.2)`, the excess shown only when there is one."""
        peak, gib = self.peak, 2**30
        over = "" if self.fits else f" (+{(peak.total - self.capacity) / gib:.1f})"
        return f"stage {peak.stage} needs {peak.total / gib:.1f} GiB of {self.capacity / gib:.0f} GiB{over}"


def element_bytes(training: Training) -> int:
    return 4 if training.precision == "fp32" else 2


def static_bytes(shard: Shard, layout: Layout, training: Training, trained: Shard | None = None,
                 features: MemoryFeatures = NO_FEATURES) -> tuple[float, float, float, float]:
    """(weights, gradients, optimizer, reference) bytes of one shard; `trained`: LoRA's adapters, the only
    parameters with gradients and optimizer state (held beside the frozen shard); default: the shard itself."""
    weight = element_bytes(training)
    # (master +) Adam m, v; reuse_fp32_param keeps a 2 B residual in place of the 4 B master (`features`)
    state = 8 if training.precision == "fp32" else (10 if features.reuses_fp32_param(layout, training) else 12)
    dense_group = layout.dp * layout.cp if layout.distributed_optimizer else 1
    expert_group = layout.edp if layout.distributed_optimizer else 1
    extra = trained or Shard(0, 0)
    trained = trained or shard
    optimizer = state * (trained.dense / dense_group + trained.experts / expert_group)
    return weight * (shard.total + extra.total), FP32 * trained.total, optimizer, weight * shard.total


@dataclass(eq=False, repr=False)  # an intermediate: not frozen, compared by identity, no repr (one method to compile)
class _Tokens:
    """Tokens one rank sees in a layer for `sequences` sequences of length s."""

    full: float  # s * b / cp: tensors split over heads or columns (then divided by tp)
    local: float  # sequence-parallel share: full / tp with SP, else full


def _tokens(layout: Layout, seq_length: int, sequences: int) -> _Tokens:
    full = seq_length * sequences / layout.cp
    return _Tokens(full, full / layout.tp if layout.sequence_parallel else full)


def flash_stats_bytes(model: ModelSpec, layout: Layout, tokens: float, features: MemoryFeatures) -> float:
    """The attention kernel's fp32 softmax statistics for `tokens` tokens (`features.flash_stats` per head)."""
    return FP32 * features.flash_stats * tokens * model.num_attention_heads / layout.tp


def swapped_bytes(model: ModelSpec, layout: Layout, training: Training, sequences: int,
                  features: MemoryFeatures) -> float:
    """Bytes per layer swap attention moves to the host (`features`): what input_norm, self_attention and
    post_attention_norm save (`layer_activation_bytes`'s attention part, and the post-attention norm's input),
    less the fused QKV output that its views (v; with qk-norm the key's norm input) keep on the device: the
    two norms' and qkv's inputs (3h, sequence-sharded), the flash output o, the query norm's input, the
    statistics."""
    if not layout.swap_attention:
        return 0.0
    a = element_bytes(training)
    tok = _tokens(layout, training.seq_length, sequences)
    q, kv = q_width(model), kv_width(model)
    copies = q + (q + kv if model.qk_layernorm else 0)
    return (a * tok.local * 3 * model.hidden_size + a * tok.full * copies / layout.tp
            + flash_stats_bytes(model, layout, tok.full, features))


def layer_activation_bytes(model: ModelSpec, layout: Layout, training: Training, sequences: int,
                           lora: Lora | None = None, features: MemoryFeatures = NO_FEATURES) -> float:
    """Bytes one layer saves for backward on one rank, no recompute, for `sequences` sequences (`lora`: the
    frozen layer with its adapters; `features`: the attention kernel's statistics)."""
    a = element_bytes(training)
    tok = _tokens(layout, training.seq_length, sequences)
    h, q, kv, tp = model.hidden_size, q_width(model), kv_width(model), layout.tp

    def linear(target: str, expert: bool = False) -> tuple[float, int]:
        """(bytes per element of the linear's input, adapter width per token) that backward keeps."""
        return adapters.input_bytes(lora, target, a, expert), adapters.rank_width(lora, target, expert)

    def column_input(target: str) -> float:
        """Bytes per hidden element a dense column-parallel linear's input keeps: the sequence-sharded input a
        trained weight saves (gathered again for its gradient), or the gathered one an adapter's A reads."""
        return a * tok.local if lora is None else adapters.input_bytes(lora, target, a) * tok.full

    # attention: norm input and qkv input (h each, sequence-sharded; an adapter's input and A output gathered);
    # q, k, v and the flash output o (linear_proj's input); qk-norm inputs; the flash softmax statistics (fp32
    # per head: `features`)
    _, qkv_rank = linear("linear_qkv")
    proj, proj_rank = linear("linear_proj")
    attention = h * (a * tok.local + column_input("linear_qkv")) + a * tok.full * (qkv_rank + proj_rank)
    attention += tok.full * (a * (q + 2 * kv + (q + kv if model.qk_layernorm else 0)) + proj * q) / tp
    attention += flash_stats_bytes(model, layout, tok.full, features)
    moe = model.moe
    if moe is None:
        # norm input and fc1 input; SwiGLU input (2F) and fc2 input (F)
        _, fc1_rank = linear("linear_fc1")
        fc2, fc2_rank = linear("linear_fc2")
        f = model.ffn_hidden_size
        return (attention + h * (a * tok.local + column_input("linear_fc1")) + tok.full * (2 * a + fc2) * f / tp
                + a * tok.full * (fc1_rank + fc2_rank))
    mlp = a * tok.local * 2 * h + FP32 * tok.local * 2 * moe.num_experts  # router logits and probabilities
    mlp += a * tok.full * 3 * moe.shared_expert_ffn_hidden_size / tp
    # each local token goes to top-k experts; the experts see the copies of the whole expert-tensor group
    # (gathered) and keep fc1 input (h) and SwiGLU and fc2 inputs (2F/etp and F/etp) per copy; back on this
    # rank, unpermute keeps each local copy's expert output (h) and routing probability
    fc1, fc1_rank = linear("linear_fc1", expert=True)
    fc2, fc2_rank = linear("linear_fc2", expert=True)
    f = moe.ffn_hidden_size / layout.etp
    local_copies = moe.topk * tok.local
    mlp += local_copies * layout.etp * (fc1 * h + (2 * a + fc2) * f + a * (fc1_rank + fc2_rank))
    mlp += local_copies * (a * h + FP32)
    return attention + mlp


def exchange_bytes(model: ModelSpec, layout: Layout, training: Training, sequences: int) -> float:
    """Context parallelism's communication buffers in a layer's attention (transient, one layer at a time).
    Ring: the rank's key and value block being sent and the one being received, and in the backward the same
    for their gradients (4 blocks of k + v). Ulysses: the all-to-all's output, q, k and v regrouped by heads,
    while its input is still held."""
    if layout.cp == 1:
        return 0.0
    a, tok = element_bytes(training), _tokens(layout, training.seq_length, sequences)
    q, kv = q_width(model), kv_width(model)
    if layout.cp_algo == "ulysses":
        return a * tok.full * (q + 2 * kv) / layout.tp
    return 4 * a * tok.full * 2 * kv / layout.tp


def layer_input_bytes(model: ModelSpec, layout: Layout, training: Training, sequences: int) -> float:
    """What full recompute keeps per layer: its input."""
    return element_bytes(training) * _tokens(layout, training.seq_length, sequences).local * model.hidden_size


def dispatch_bytes(model: ModelSpec, layout: Layout, training: Training, sequences: int) -> float:
    """MoE all-to-all send and receive buffers of permuted tokens (transient, one layer at a time)."""
    if model.moe is None:
        return 0.0
    tok = _tokens(layout, training.seq_length, sequences)
    return 2 * element_bytes(training) * model.moe.topk * tok.local * model.hidden_size


def in_flight_chunks(layout: Layout, stage: int, micro_batches: int | None = None) -> int:
    """Micro-batch chunks whose activations a 1F1B stage holds at its peak (after warm-up).

    Plain 1F1B: pp - stage. Interleaved (Megatron's warm-up + 1): pp * (vpp + 1) - 1 - 2 * stage chunks of
    stage_layers / vpp layers each. Never more than the step has (`micro_batches` per rank; default the
    layout's, packing has fewer).
    """
    m = layout.num_microbatches if micro_batches is None else micro_batches
    if layout.vpp == 1:
        return min(layout.pp - stage, m)
    return min(layout.pp * (layout.vpp + 1) - 1 - 2 * stage, m * layout.vpp)


@dataclass(eq=False, repr=False)  # an intermediate: not frozen, compared by identity, no repr (one method to compile)
class _PerLayer:
    """Per-micro-batch quantities every stage shares (computed once per layout)."""

    full: float  # bytes a layer saves without recompute
    kept: float  # bytes a layer keeps under full recompute (its input)
    dispatch: float  # MoE dispatch buffers
    tokens: _Tokens
    last_stage_extra: float = 0.0  # the final norm's unfused saves (0 with fused kernels)
    swapped: float = 0.0  # of `full`, what swap attention keeps on the host (one layer's on the device)
    exchange: float = 0.0  # context parallelism's buffers in one layer's attention

    @classmethod
    def of(cls, model: ModelSpec, layout: Layout, training: Training, fused: bool = True,
           lora: Lora | None = None, features: MemoryFeatures = NO_FEATURES) -> _PerLayer:
        sequences = SEQUENCES_PER_PAIR * layout.micro_batch_size
        layer_extra, last_extra = (0.0, 0.0) if fused else unfused_kernel_bytes(model, layout, training, sequences,
                                                                                frozen=lora is not None)
        return cls(
            full=layer_activation_bytes(model, layout, training, sequences, lora, features) + layer_extra,
            kept=layer_input_bytes(model, layout, training, sequences),
            dispatch=dispatch_bytes(model, layout, training, sequences),
            tokens=_tokens(layout, training.seq_length, sequences),
            last_stage_extra=last_extra,
            swapped=swapped_bytes(model, layout, training, sequences, features),
            exchange=exchange_bytes(model, layout, training, sequences),
        )


def unfused_kernel_bytes(model: ModelSpec, layout: Layout, training: Training, sequences: int,
                         frozen: bool = False) -> tuple[float, float]:
    """(per layer, last stage) bytes that the runtime's CPU kernels save beyond the fused ones assumed above
    (flash attention, fused RMSNorm, SwiGLU and rotary): torch's SDPA flash kernel for attention, megatron-core's
    unfused local norms, SwiGLU and rotary. Each term was matched tensor by tensor against autograd's
    saved-tensor log (bench/memory_vs_measured.py).
    """
    a, s, tp = element_bytes(training), training.seq_length, layout.tp
    tok = _tokens(layout, s, sequences)
    q, kv, heads, groups = q_width(model), kv_width(model), model.num_attention_heads, model.num_query_groups
    # the normalized output (kept for the norm weight's gradient: not when it is frozen, as under LoRA) and 1/rms
    normalized = 0 if frozen else 1
    hidden_norm = normalized * a * tok.local * model.hidden_size + FP32 * tok.local
    extra = 2 * hidden_norm
    if model.qk_layernorm:
        # normalized q and k with their 1/rms per head; k's norm input is a view of the fused qkv output,
        # which keeps the whole [q + 2 kv] storage, and q's is a copy of its slice unless the rank holds
        # one query group (then the reshape is a view of the same storage)
        q_copy = q if groups // tp > 1 else 0
        extra += a * tok.full / tp * (normalized * (q + kv) + q_copy + kv + heads + groups)
    extra += 4 * a * s * model.head_dim  # rotary cos and sin for q and k
    # core attention adds nothing: SDPA keeps q, k, v, its output and the log-sum-exp, as flash attention does
    # SwiGLU's silu output and product (2F per token): the dense MLP, or the shared expert and every one of
    # the top-k copies of this rank's tokens in the routed experts
    if model.moe is None:
        extra += 2 * a * tok.full / tp * model.ffn_hidden_size
    else:
        extra += 2 * a * tok.full / tp * model.moe.shared_expert_ffn_hidden_size
        extra += 2 * a * model.moe.topk * tok.local * model.moe.ffn_hidden_size
    return extra, hidden_norm


def chunk_saved_bytes(layout: Layout, per_layer: _PerLayer, layers: float) -> tuple[float, float]:
    """(saved, recompute working set) bytes of one micro-batch through a chunk of `layers` layers."""
    full = per_layer.full - per_layer.swapped  # what a layer that is not recomputed keeps on the device
    if layout.recompute != "full":
        return layers * full, 0.0
    n = layout.recompute_num_layers or 1
    if layout.recompute_method == "block":
        recomputed = min(n, layers)
        return recomputed * per_layer.kept + (layers - recomputed) * full, per_layer.full
    return math.ceil(layers / n) * per_layer.kept, min(n, layers) * per_layer.full


def communicators(layout: Layout, model: ModelSpec, stage: int) -> int:
    """Collective communicators a rank of `stage` uses (each holds 2 x HCCL_BUFFSIZE on Ascend)."""
    groups = [layout.tp, layout.cp, layout.dp * layout.cp, layout.pp, layout.tp * layout.pp]
    if model.moe is not None:
        groups += [layout.ep, layout.etp, layout.edp]
    count = sum(1 for size in groups if size > 1)
    if layout.pp > 1 and stage in (0, layout.pp - 1) and model.tie_embeddings:
        count += 1  # embedding group (tied weights' gradient sync)
    return count


def stage_memory(
    model: ModelSpec, hardware: HardwareSpec, layout: Layout, training: Training, stage: int, layers: int,
    per_layer: _PerLayer, ratios: tuple[float, ...], micro_batches: int | None = None,
    workload: Workload = DPO_LIVE, features: MemoryFeatures = NO_FEATURES, head: float = 1.0,
) -> StageMemory:
    """`ratios`: each of the rank's micro-batches' expected length / the longest (per_layer's), in the order
    the rank runs them; `micro_batches`: per rank and step (default: the layout's); `head`: the share of the
    positions the LM head runs on (`head.head_fraction`)."""
    shard = stage_shard(model, layout, stage, layers)
    trained = adapters.stage_adapters(model, layout, workload.lora, layers) if workload.lora is not None else None
    weights, gradients, optimizer, reference = static_bytes(shard, layout, training, trained, features)
    if not workload.reference_weights:
        reference = 0.0
    a = element_bytes(training)
    tokens = per_layer.tokens
    last = stage == layout.pp - 1
    # the vocab-parallel logits and their fp32 softmax over the head's positions (in fp32 training the cross
    # entropy's float() is the logits themselves: one copy, measured on CPU)
    head_positions = tokens.full * head
    logits = head_positions * model.vocab_size / layout.tp * (FP32 if a == FP32 else a + FP32) if last else 0.0
    receives = layout.pp > 1 and (stage > 0 or layout.vpp > 1)
    comm = communicators(layout, model, stage) * 2 * hardware.hccl_buffsize_mb * MIB
    dispatch = per_layer.dispatch + per_layer.exchange if layers else 0.0  # a layer's communication buffers
    if not workload.trains:  # forward only: a layer's working set, the logits, one tensor in and one out
        return StageMemory(
            stage=stage, layers=layers, params=shard.total, weights=weights, gradients=0.0, optimizer=0.0,
            reference=0.0, activations=0.0,
            pipeline_buffers=2 * a * tokens.local * model.hidden_size if layout.pp > 1 else 0.0,
            logits=logits, transient=(per_layer.full if layers else 0.0) + dispatch, comm_buffers=comm,
            reserve=hardware.reserved_gib * GIB)
    chunks = in_flight_chunks(layout, stage, micro_batches)
    held = min(chunks, 1) + sum(ratios[min(i, len(ratios) - 1)] for i in range(1, chunks))
    saved, recompute_set = chunk_saved_bytes(layout, per_layer, layers / layout.vpp)
    activations = held * saved
    if last:  # final norm input, and the head's: its positions' hidden states (gathered whole under SP); a
        # frozen head, as under LoRA, keeps none: it has no weight gradient
        head_input = 0.0 if workload.lora is not None else head_positions
        activations += a * (tokens.local + head_input) * model.hidden_size + per_layer.last_stage_extra
    # with the live reference, its hidden states travel with the policy's: [s, 4 * mbs, h] per held micro-batch
    carried = 2 if workload.reference_forward else 1
    pipeline_buffers = held * carried * a * tokens.local * model.hidden_size if receives else 0.0
    # the live reference's forward: one layer's working set, and on the last stage its logits (freed once its
    # log-probabilities are gathered, before the policy's own logits exist)
    reference_forward = max(per_layer.full if layers else 0.0, logits) if workload.reference_forward else 0.0
    # swap attention: one layer's swapped tensors are on the device while that layer runs (or is fetched back)
    swapping = per_layer.swapped if layers and layout.recompute != "full" else 0.0
    transient = max(recompute_set, reference_forward) + dispatch + swapping
    return StageMemory(
        stage=stage, layers=layers, params=shard.total + (trained.total if trained is not None else 0),
        weights=weights, gradients=gradients, optimizer=optimizer, reference=reference,
        activations=activations, pipeline_buffers=pipeline_buffers, logits=logits, transient=transient,
        comm_buffers=comm, reserve=hardware.reserved_gib * GIB,
    )


def estimate_memory(
    model: ModelSpec, hardware: HardwareSpec, layout: Layout, training: Training,
    lengths: Lengths | None = None, workload: Workload = DPO_LIVE, peak_candidates_only: bool = False,
    traits: Traits = DPOC_CPU,
) -> MemoryEstimate:
    """Memory per device for every pipeline stage of a DPO run (`workload`: live or precomputed reference).

    `peak_candidates_only` (for the search) keeps only the stages that can hold the peak: the first, the
    last, and of the middle stages the first with each layer count (a later one with as many layers holds
    fewer micro-batches and the same state), so `peak` and `fits` are exact at a fraction of the cost.

    `lengths` (default: nothing known, every micro-batch may be `seq_length` long): static padding holds every
    micro-batch at `seq_length`; dynamic padding one at the longest a micro-batch can be (the peak a long pair
    causes) and the others at the expected lengths of the rank's next micro-batches (`lengths.micro_batches`).
    Packing: a micro-batch's stream is at most its budget, the tokens of the unpacked micro-batch at full
    length; one held at the budget and the others at the fill; fewer micro-batches. Every DPO loss (sigmoid,
    hinge, ipo, with or without the SFT term) trains on chosen + rejected, so the loss settings do not change
    the memory.
    """
    lengths = lengths or MeanLength(training.seq_length)
    micro_batches = None
    if training.packing:
        steps = lengths.packed(layout, training)
        micro_batches = math.ceil(steps.micro_batches - 1e-9)
        row = steps.fill * training.seq_length if training.dynamic_padding else float(training.seq_length)
        rows = MicroBatchLengths((row,) * micro_batches, (row * row,) * micro_batches, float(training.seq_length),
                                 row, row * row)
    else:
        rows = lengths.micro_batches(layout, training, traits.batching)
    return _estimate(model, hardware, layout, training, rows, micro_batches, workload, peak_candidates_only,
                     traits.features, head_fraction(lengths, training, rows.peak, traits.response_head))


def reference_pass_memory(
    model: ModelSpec, hardware: HardwareSpec, layout: Layout, training: Training, lengths: Lengths,
    micro_batch: int, traits: Traits = DPOC_CPU,
) -> MemoryEstimate:
    """Memory per device of the precompute pass: `layout`'s parallelism, `micro_batch` pairs per forward, the
    dataset sorted by length (its longest micro-batch holds its longest pairs); `traits` the target's."""
    peak = lengths.peak(layout, replace(training, dynamic_padding=True))
    rows = MicroBatchLengths((peak,), (peak * peak,), peak, peak, peak * peak)
    return _estimate(model, hardware, replace(layout, micro_batch_size=micro_batch), training, rows, None,
                     REFERENCE_PASS, False, traits.features,
                     head_fraction(lengths, replace(training, dynamic_padding=True), peak, traits.response_head))


def _estimate(model: ModelSpec, hardware: HardwareSpec, layout: Layout, training: Training,
              rows: MicroBatchLengths, micro_batches: int | None, workload: Workload, peak_candidates_only: bool,
              features: MemoryFeatures, head: float) -> MemoryEstimate:
    # fused kernels (flash attention, fused norms) on npu/cuda; SDPA and unfused local layers on cpu; every
    # per-micro-batch term at the longest length a micro-batch can have
    at_peak = replace(training, seq_length=math.ceil(rows.peak)) if rows.peak < training.seq_length else training
    per_layer = _PerLayer.of(model, layout, at_peak, fused=hardware.device != "cpu", lora=workload.lora,
                             features=features)
    ratios = tuple(1.0 if rows.together else length / rows.peak for length in rows.lengths)
    layers = real_layers_per_stage(layout)
    indices = range(len(layers))
    if peak_candidates_only:
        first_with = {n: i for i, n in reversed(list(enumerate(layers[1:-1], 1)))}
        indices = sorted({0, len(layers) - 1, *first_with.values()})
    stages = tuple(
        stage_memory(model, hardware, layout, at_peak, i, layers[i], per_layer, ratios, micro_batches, workload,
                     features, head)
        for i in indices
    )
    return MemoryEstimate(stages, hardware.memory_gib * GIB)
