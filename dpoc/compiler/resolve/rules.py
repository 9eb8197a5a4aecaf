"""Every start-up rule Megatron, MindSpeed and the Atlas topology impose, checked before launch.

Each rule is a small named function of a `Context` returning `Violation`s that name the recipe field to fix,
the numbers involved and the valid alternatives. `resolve` runs them on the user's layout; the planner runs
the very same functions on every candidate layout, so no rule exists twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dpoc.contract.errors import counted
from dpoc.contract.plan import DPO, HardwareSpec, Layout, ModelSpec, Training


@dataclass(frozen=True)
class Context:
    """What the rules check: the resolved model, hardware, layout, training and loss."""
    model: ModelSpec
    hardware: HardwareSpec
    layout: Layout
    training: Training
    dpo: DPO


@dataclass(frozen=True)
class Violation:
    """A broken rule: the recipe field to change and why (a warning still builds)."""
    field: str  # the recipe field to change
    message: str
    warning: bool = False  # runs, but slowly or riskily: reported, not fatal


Rule = Callable[[Context], Iterable[Violation]]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _set(values: Iterable[int]) -> str:
    return "{" + ", ".join(str(v) for v in values) + "}"


def total_layers(model: ModelSpec, layout: Layout) -> int:
    """Transformer layers including MindSpeed no-op placeholders."""
    return model.num_layers + len(layout.noop_layers)


# --- the parallel grid -------------------------------------------------------------------------------


def dense_grid(c: Context) -> Iterable[Violation]:
    lay, world = c.layout, c.layout.world_size
    grid = lay.tp * lay.pp * lay.cp
    if world % grid == 0:
        return
    what = (f"tp·pp·cp = {lay.tp}·{lay.pp}·{lay.cp} = {grid} does not divide the world size {world} "
            f"({counted(c.hardware.nodes, 'node')} × {c.hardware.devices_per_node} devices)")
    ok_tp = [t for t in divisors(world) if world % (t * lay.pp * lay.cp) == 0]
    if ok_tp:
        yield Violation("parallelism.tp", f"{what}; valid: tp in {_set(ok_tp)} at pp={lay.pp}, cp={lay.cp}")
    else:
        ok_pp = [p for p in divisors(world) if world % (lay.tp * p * lay.cp) == 0]
        yield Violation("parallelism.pp", f"{what}; valid: pp in {_set(ok_pp)} at tp={lay.tp}, cp={lay.cp}")


def expert_grid(c: Context) -> Iterable[Violation]:
    lay, world = c.layout, c.layout.world_size
    grid = lay.etp * lay.ep * lay.pp
    if world % grid == 0 or (lay.etp == lay.tp and world % (lay.tp * lay.pp)):
        return  # fine, or the same cause as a dense-grid violation (etp = tp), which is reported there
    what = f"expert grid etp·ep·pp = {lay.etp}·{lay.ep}·{lay.pp} = {grid} does not divide the world size {world}"
    ok_ep = [e for e in divisors(world) if world % (lay.etp * e * lay.pp) == 0]
    if ok_ep:
        yield Violation("parallelism.ep", f"{what}; valid: ep in {_set(ok_ep)} at etp={lay.etp}, pp={lay.pp}")
    else:
        ok_etp = [e for e in divisors(world) if world % (e * lay.ep * lay.pp) == 0]
        yield Violation("parallelism.etp", f"{what}; valid: etp in {_set(ok_etp)} at ep={lay.ep}, pp={lay.pp}")


def heads_divisible_by_tp(c: Context) -> Iterable[Violation]:
    m, tp = c.model, c.layout.tp
    if m.num_attention_heads % tp or m.num_query_groups % tp:
        ok = [t for t in divisors(m.num_query_groups) if m.num_attention_heads % t == 0]
        yield Violation("parallelism.tp", f"tp={tp}: {m.num_attention_heads} attention heads and "
                        f"{m.num_query_groups} KV heads need tp in {_set(ok)}")


def vocab_divisible_by_tp(c: Context) -> Iterable[Violation]:
    """The vocab-parallel embedding and output layer split rows evenly; the runtime never pads the vocabulary
    (padded rows would change every log-probability of weights trained without them)."""
    vocab, tp = c.model.vocab_size, c.layout.tp
    if vocab % tp:
        ok = [t for t in divisors(vocab) if t <= c.hardware.devices_per_node]
        yield Violation("parallelism.tp", f"tp={tp}: the {vocab} vocabulary rows do not split evenly; valid: tp in "
                        f"{_set(ok)}, or weights whose vocab_size is a multiple of tp")


def tp_within_node(c: Context) -> Iterable[Violation]:
    per_node, tp = c.hardware.devices_per_node, c.layout.tp
    if per_node % tp:
        yield Violation("parallelism.tp", f"tp={tp} would put a tensor-parallel group across nodes over the slow "
                        f"inter-node link ({per_node} devices per node); valid: tp in {_set(divisors(per_node))}")


# --- layers and the pipeline -------------------------------------------------------------------------


def layers_divisible_by_pp(c: Context) -> Iterable[Violation]:
    lay = c.layout
    layers = total_layers(c.model, lay)
    if lay.num_layer_list is None and layers % lay.pp:
        yield Violation("parallelism.pp", f"pp={lay.pp} does not divide {layers} layers; valid: pp in "
                        f"{_set(divisors(layers))}, or give parallelism.num_layer_list or parallelism.noop_layers")


def layer_list_matches(c: Context) -> Iterable[Violation]:
    lay, layers = c.layout, c.model.num_layers
    lst = lay.num_layer_list
    if lst is None:
        return
    if len(lst) != lay.pp:
        yield Violation("parallelism.num_layer_list", f"has {len(lst)} entries but pp={lay.pp} (one per stage)")
    if sum(lst) != layers:
        yield Violation("parallelism.num_layer_list", f"sums to {sum(lst)} but the model has {layers} layers")
    if lay.vpp > 1 or lay.noop_layers:
        yield Violation("parallelism.num_layer_list", "cannot be combined with vpp or noop_layers (MindSpeed-LLM "
                        "rejects it); valid: an even split with vpp, or noop_layers alone")


def noop_layers_in_range(c: Context) -> Iterable[Violation]:
    layers = total_layers(c.model, c.layout)
    bad = [i for i in c.layout.noop_layers if i >= layers]
    if bad:
        yield Violation("parallelism.noop_layers", f"indices {bad} are outside the {layers} layers "
                        f"({c.model.num_layers} real + {len(c.layout.noop_layers)} no-op); valid: 0..{layers - 1}")


def virtual_pipeline(c: Context) -> Iterable[Violation]:
    lay = c.layout
    if lay.vpp == 1:
        return
    if lay.pp == 1:
        yield Violation("parallelism.vpp", f"vpp={lay.vpp} needs pp > 1 (interleaving splits pipeline stages)")
        return
    per_stage = total_layers(c.model, lay) // lay.pp
    if per_stage % lay.vpp:
        yield Violation("parallelism.vpp", f"vpp={lay.vpp} does not divide the {per_stage} layers per pipeline "
                        f"stage; valid: vpp in {_set(divisors(per_stage))}")


# --- batch and sequence ------------------------------------------------------------------------------


def global_batch_divisible(c: Context) -> Iterable[Violation]:
    lay = c.layout
    if lay.world_size % (lay.tp * lay.pp * lay.cp):
        return  # dense_grid reports it; dp is not an integer
    step = lay.micro_batch_size * lay.dp
    if c.layout.global_batch_size % step:
        below = lay.global_batch_size // step * step
        ok = [g for g in (below, below + step) if g > 0]
        yield Violation("training.global_batch_size", f"{lay.global_batch_size} pairs is not a multiple of "
                        f"micro_batch_size·dp = {lay.micro_batch_size}·{lay.dp} = {step}; valid: e.g. {_set(ok)}")


def sequence_fits_model(c: Context) -> Iterable[Violation]:
    seq, limit = c.training.seq_length, c.model.max_position_embeddings
    if seq > limit:
        yield Violation("training.seq_length", f"{seq} exceeds the model's max_position_embeddings {limit}; "
                        f"valid: seq_length <= {limit}")


def context_parallel(c: Context) -> Iterable[Violation]:
    lay, seq, heads = c.layout, c.training.seq_length, c.model.num_attention_heads
    if lay.cp == 1:
        return
    if seq % (2 * lay.cp):
        yield Violation("parallelism.cp", f"cp={lay.cp}: seq_length {seq} must be divisible by 2·cp = {2 * lay.cp}")
    if lay.cp_algo == "ulysses" and heads % (lay.cp * lay.tp):  # MindSpeed's UlyssesContextParallelFeature
        ok = [x for x in divisors(heads // lay.tp) if x > 1] if heads % lay.tp == 0 else []
        yield Violation("parallelism.cp", f"cp={lay.cp}: Ulysses context parallelism needs the {heads} heads "
                        f"divisible by cp·tp = {lay.cp * lay.tp}; valid: cp in {_set(ok)}, or cp_algo=ring")


def sequence_parallel_needs_tp(c: Context) -> Iterable[Violation]:
    if c.layout.sequence_parallel and c.layout.tp == 1:
        yield Violation("parallelism.sequence_parallel", "sequence parallelism needs tp > 1 (tp=1); valid: false")


def static_padding_divisible(c: Context) -> Iterable[Violation]:
    lay, seq = c.layout, c.training.seq_length
    unit = lay.tp * lay.cp if lay.sequence_parallel else lay.cp
    if not c.training.dynamic_padding and seq % unit:
        yield Violation("training.seq_length", f"{seq} must be divisible by tp·cp = {unit} when sequences are padded "
                        f"to seq_length; valid: a multiple of {unit}, or training.dynamic_padding=true")


# --- mixture of experts ------------------------------------------------------------------------------


def expert_knobs_need_moe(c: Context) -> Iterable[Violation]:
    if c.model.moe is not None:
        return
    lay = c.layout
    for field, is_set in (("ep", lay.ep > 1), ("etp", lay.etp != lay.tp), ("moe_grouped_gemm", lay.moe_grouped_gemm),
                          ("moe_tp_extend_ep", lay.moe_tp_extend_ep),
                          ("moe_alltoall_overlap_comm", lay.moe_alltoall_overlap_comm)):
        if is_set:
            yield Violation(f"parallelism.{field}", f"{c.model.name} is a dense model (no experts); remove it")


def experts_divisible_by_ep(c: Context) -> Iterable[Violation]:
    moe, ep = c.model.moe, c.layout.ep
    if moe is not None and moe.num_experts % ep:
        yield Violation("parallelism.ep", f"ep={ep} does not divide {moe.num_experts} experts; valid: ep in "
                        f"{_set(divisors(moe.num_experts))}")


def expert_tensor_parallel(c: Context) -> Iterable[Violation]:
    lay = c.layout
    if c.model.moe is not None and lay.etp not in (1, lay.tp):
        yield Violation("parallelism.etp", f"etp={lay.etp}: experts are split either like attention or not at all "
                        f"(the weight converter accepts only these); valid: etp in {_set(sorted({1, lay.tp}))}")


def moe_needs_sequence_parallel(c: Context) -> Iterable[Violation]:
    if c.model.moe is not None and c.layout.tp > 1 and not c.layout.sequence_parallel:
        yield Violation("parallelism.sequence_parallel", f"a MoE model with tp={c.layout.tp} needs sequence "
                        "parallelism (Megatron refuses it otherwise); valid: true")


def tp_extend_ep(c: Context) -> Iterable[Violation]:
    lay, moe = c.layout, c.model.moe
    if moe is None or not lay.moe_tp_extend_ep:
        return
    if moe.num_experts % (lay.tp * lay.ep):
        yield Violation("parallelism.moe_tp_extend_ep", f"spreads {moe.num_experts} experts over tp·ep = "
                        f"{lay.tp}·{lay.ep} = {lay.tp * lay.ep}, which does not divide them")
    if lay.moe_dispatcher == "allgather":
        yield Violation("parallelism.moe_tp_extend_ep", "is incompatible with the allgather dispatcher; valid: "
                        "moe_dispatcher in {alltoall, alltoall_seq}")
    if lay.etp != lay.tp:
        yield Violation("parallelism.moe_tp_extend_ep", f"replaces expert tensor parallelism; it needs etp = tp "
                        f"(etp={lay.etp}, tp={lay.tp})")


def alltoall_overlap(c: Context) -> Iterable[Violation]:
    lay = c.layout
    if not lay.moe_alltoall_overlap_comm:
        return
    missing = [name for name, ok in (("moe_permutation_async_comm=true", lay.moe_permutation_async_comm),
                                     ("moe_grouped_gemm=true", lay.moe_grouped_gemm),
                                     ("moe_dispatcher=alltoall_seq", lay.moe_dispatcher == "alltoall_seq"),
                                     ("moe_tp_extend_ep=true", lay.tp == 1 or lay.moe_tp_extend_ep)) if not ok]
    if missing:
        yield Violation("parallelism.moe_alltoall_overlap_comm", f"needs {', '.join(missing)}")


def grouped_gemm_device(c: Context) -> Iterable[Violation]:
    if c.layout.moe_grouped_gemm and c.hardware.device == "cpu":
        yield Violation("parallelism.moe_grouped_gemm", "grouped GEMM kernels exist only on npu and cuda devices "
                        f"(hardware {c.hardware.name} is cpu); valid: false")


def expert_group_placement(c: Context) -> Iterable[Violation]:
    """EP·ETP ranks are contiguous: beyond a node they ride the inter-node fabric."""
    lay, hw = c.layout, c.hardware
    span = lay.ep * lay.etp
    if c.model.moe is None or span <= hw.devices_per_node:
        return
    pod = hw.superpod_nodes * hw.devices_per_node
    if pod and span <= pod:
        return  # A3: inside a SuperPoD the UB fabric is as fast as inside a node
    yield Violation("parallelism.ep", f"the expert-parallel group (ep·etp = {span} devices) spans nodes over the "
                    f"{hw.inter_node_gbps:g} GB/s inter-node link; all-to-all will be slow", warning=True)


# --- recompute, schedule, loss -----------------------------------------------------------------------


def recompute_options(c: Context) -> Iterable[Violation]:
    lay = c.layout
    if lay.recompute != "full" and (lay.recompute_method or lay.recompute_num_layers):
        yield Violation("parallelism.recompute_method", f"recompute_method/recompute_num_layers apply to full "
                        f"recompute only (recompute={lay.recompute}); valid: recompute=full, or remove them")
    if lay.recompute == "full" and lay.recompute_num_layers:
        per_chunk = min(lay.stage_layers) // lay.vpp if lay.stage_layers else 0
        if lay.recompute_num_layers > per_chunk:
            yield Violation("parallelism.recompute_num_layers", f"{lay.recompute_num_layers} exceeds the "
                            f"{per_chunk} layers of the smallest pipeline chunk; valid: 1..{per_chunk}")


def pipeline_has_enough_microbatches(c: Context) -> Iterable[Violation]:
    lay = c.layout
    if lay.pp > 1 and 0 < lay.num_microbatches < lay.pp:
        bubble = 100 * (lay.pp - 1) // (lay.num_microbatches + lay.pp - 1)
        yield Violation("training.global_batch_size", f"{lay.num_microbatches} micro-batches per step cannot fill "
                        f"{lay.pp} pipeline stages (bubble over {bubble}%)", warning=True)


def learning_rate_schedule(c: Context) -> Iterable[Violation]:
    t = c.training
    if t.min_lr > t.lr:
        yield Violation("training.min_lr", f"{t.min_lr:g} exceeds lr {t.lr:g}; valid: min_lr <= lr")
    if t.warmup_iters >= t.train_iters:  # megatron-core asserts warm-up < decay steps (train_iters here)
        yield Violation("training.warmup_iters", f"{t.warmup_iters} is not below train_iters {t.train_iters}; "
                        "valid: fewer warm-up steps than training steps")


RULES: tuple[Rule, ...] = (
    dense_grid, expert_grid, heads_divisible_by_tp, vocab_divisible_by_tp, tp_within_node,
    layers_divisible_by_pp, layer_list_matches, noop_layers_in_range, virtual_pipeline,
    global_batch_divisible, sequence_fits_model, context_parallel, sequence_parallel_needs_tp,
    static_padding_divisible,
    expert_knobs_need_moe, experts_divisible_by_ep, expert_tensor_parallel, moe_needs_sequence_parallel,
    tp_extend_ep, alltoall_overlap, grouped_gemm_device, expert_group_placement,
    recompute_options, pipeline_has_enough_microbatches, learning_rate_schedule,
)


# field -> the field its valid values are stated relative to: while that one is wrong, a violation of this one
# is a follow-on (tp=3 makes a pinned etp=2 "not in {1, 3}"), and only the root cause is reported
FOLLOW_ON = {"parallelism.etp": "parallelism.tp"}


def check(context: Context) -> list[Violation]:
    found = [v for rule in RULES for v in rule(context)]
    wrong = {v.field for v in found if not v.warning}
    return [v for v in found if FOLLOW_ON.get(v.field) not in wrong]
