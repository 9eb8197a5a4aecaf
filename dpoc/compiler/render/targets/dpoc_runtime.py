"""The dpoc runtime target: megatron-core driven by `megatron.args` (`python -m dpoc.runtime.train`)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from dpoc.compiler.render import templating
from dpoc.compiler.resolve.rules import Violation
from dpoc.contract import losses
from dpoc.contract.errors import EXIT_PREEMPTED, EXIT_USER_ERROR
from dpoc.contract.megatron_args import Arg, format_args, model_args
from dpoc.contract.plan import DPO, HardwareSpec, Plan
from dpoc.contract.requirements import Requirement
from dpoc.contract.runs import INPUT_ERROR_ENV, PREEMPTED
from dpoc.planner.features import SORT_AND_CUT, Traits, kernel_features

if TYPE_CHECKING:
    from dpoc.planner.search import SearchSpace

NAME = "dpoc"


def requirements() -> list[Requirement]:
    """What the runtime imports on a node, at the versions of the `runtime` extra (pyproject.toml)."""
    return [Requirement("torch", "torch", (2, 5)), Requirement("megatron.core", "megatron-core", (0, 12), (0, 20)),
            Requirement("numpy", "numpy", (1, 24))]


def traits(hardware: HardwareSpec) -> Traits:
    """How the planner models this target: each global batch sorted and cut into micro-batches, each padded to
    its own longest pair (`runtime/data.py`); no optional memory feature (no fp32 reuse, no swap), only its
    kernels' saved tensors; the LM head on the response positions only (`runtime/model/gpt.py`)."""
    return Traits(NAME, SORT_AND_CUT, kernel_features(hardware.device), response_head=True)


def node_script(rank: int) -> str:
    """Node `rank`'s launch script, relative to the build directory."""
    return f"nodes/node-{rank}.sh"


def files(plan: Plan) -> dict[str, str]:
    """What this target renders: the argument files (fresh and resume), one node script per node, and with
    precomputed reference log-probs the pass that makes them (reference.sh)."""
    out = {path: format_args(megatron_args(plan, resume=resume))
           for resume, path in ((False, "megatron.args"), (True, "resume/megatron.args"))}
    values = templating.node_values(plan)
    precomputed = plan.dpo.reference == "precomputed"
    for rank, host in templating.node_hosts(plan):
        out[node_script(rank)] = templating.template("node.sh.j2", node_rank=rank, host=host, **values,
                                                      preempted_marker=PREEMPTED, exit_preempted=EXIT_PREEMPTED,
                                                      input_error_env=INPUT_ERROR_ENV,
                                                      exit_input_error=EXIT_USER_ERROR,
                                                      precomputed_reference=precomputed)
    if precomputed:
        out["reference.sh"] = templating.template("reference.sh.j2", **values, data_path=plan.data.output_prefix,
                                                  micro_batch_size=plan.dpo.reference_micro_batch_size,
                                                  input_error_env=INPUT_ERROR_ENV, exit_input_error=EXIT_USER_ERROR)
    return out


def unsupported(plan: Plan) -> list[Violation]:
    """Knobs megatron-core's local (non-TransformerEngine) stack cannot express, and a start without weights."""
    why = "the dpoc runtime (megatron-core, local layers)"
    layout = plan.layout
    out = []
    if plan.checkpoint.init == "converted" and plan.checkpoint.load is None:
        out.append(Violation("model.hf_weights", "is required to convert the initial weights (or give "
                             "checkpoint.load, or checkpoint.init=random)"))
    if layout.moe_dispatcher == "alltoall_seq":
        out.append(Violation("parallelism.moe_dispatcher", f"{why} has no alltoall_seq dispatcher; valid: "
                             "alltoall, allgather"))
    if layout.cp_algo != "ring":
        out.append(Violation("parallelism.cp_algo", f"{layout.cp_algo}: {why} runs ring context parallelism only; "
                             "valid: ring, or runtime=mindspeed-rl"))
    if layout.noop_layers:
        out.append(Violation("parallelism.noop_layers", f"{why} has no no-op layers; valid: num_layer_list for "
                             "an uneven pipeline"))
    for knob in ("moe_tp_extend_ep", "moe_alltoall_overlap_comm", "moe_permutation_async_comm", "swap_attention"):
        if getattr(layout, knob):
            out.append(Violation(f"parallelism.{knob}", f"is a MindSpeed feature {why} does not have; valid: false, "
                                 "or runtime=mindspeed-rl"))
    return out


def megatron_args(plan: Plan, resume: bool) -> list[Arg]:
    """The runtime's arguments. `resume` loads the policy, optimizer, RNG and data position from `save`."""
    return [*model_args(plan.model), *_parallel_args(plan), *_training_args(plan), *_dpo_args(plan),
            *_lora_args(plan), *_checkpoint_args(plan, resume),
            ("--log-interval", plan.training.log_interval), ("--dpoc-run-dir", plan.run_dir),
            ("--dpoc-plan-hash", plan.hash())]


def _parallel_args(plan: Plan) -> list[Arg]:
    """How the experts are computed, the parallel layout, and the device."""
    lay = plan.layout
    args: list[Arg] = []
    if plan.model.moe is not None:
        args.append(("--moe-token-dispatcher-type", lay.moe_dispatcher))
        if lay.moe_grouped_gemm:
            args.append(("--moe-grouped-gemm", True))
        args.append(("--dpoc-moe-experts", lay.moe_experts))
    args += [
        ("--tensor-model-parallel-size", lay.tp),
        ("--pipeline-model-parallel-size", lay.pp),
    ]
    if lay.vpp > 1:
        args.append(("--num-layers-per-virtual-pipeline-stage", lay.stage_layers[0] // lay.vpp))
    if lay.num_layer_list is not None:
        args.append(("--num-layer-list", lay.num_layer_list))
    args += [
        ("--context-parallel-size", lay.cp),
        ("--expert-model-parallel-size", lay.ep),
        ("--expert-tensor-parallel-size", lay.etp),
    ]
    if lay.sequence_parallel:
        args.append(("--sequence-parallel", True))
    if lay.distributed_optimizer:
        args.append(("--use-distributed-optimizer", True))
    if lay.cp > 1 and plan.hardware.device == "cuda":  # not TransformerEngine's, which auto would pick
        args.append(("--dpoc-core-attention", "sdpa"))
    return [*args, ("--distributed-backend", plan.hardware.backend), ("--dpoc-device", plan.hardware.device)]


def _training_args(plan: Plan) -> list[Arg]:
    """Batch, schedule, optimizer, precision, recompute and padding."""
    lay, t = plan.layout, plan.training
    args: list[Arg] = [
        ("--micro-batch-size", lay.micro_batch_size),
        ("--global-batch-size", lay.global_batch_size),
        ("--seq-length", t.seq_length),
        ("--train-iters", t.train_iters),
        ("--lr", t.lr),
        ("--min-lr", t.min_lr),
        ("--lr-decay-style", t.lr_decay_style),
        ("--lr-warmup-iters", t.warmup_iters),
        ("--weight-decay", t.weight_decay),
        ("--clip-grad", t.clip_grad),
        ("--adam-beta1", t.adam_beta1),
        ("--adam-beta2", t.adam_beta2),
        ("--adam-eps", t.adam_eps),
        ("--seed", t.seed),
    ]
    if t.precision != "fp32":
        args.append((f"--{t.precision}", True))
    if lay.recompute != "none":
        args.append(("--recompute-granularity", lay.recompute))
        if lay.recompute == "full":
            args += [("--recompute-method", lay.recompute_method), ("--recompute-num-layers", lay.recompute_num_layers)]
    if t.dynamic_padding:
        args.append(("--no-pad-to-seq-lengths", True))
    if t.packing:
        args.append(("--dpoc-packing", True))
    return args


def _dpo_args(plan: Plan) -> list[Arg]:
    """The pairwise dataset and its tokenizer, the DPO loss and the reference."""
    d = plan.dpo
    args: list[Arg] = [
        ("--data-path", plan.data.output_prefix),
        ("--is-pairwise-dataset", True),
        ("--tokenizer-type", "PretrainedFromHF"),
        ("--tokenizer-name-or-path", plan.data.tokenizer),
        ("--stage", "dpo"),
        ("--dpo-loss-type", d.loss),
        ("--dpo-beta", d.beta),
        ("--dpo-label-smoothing", d.label_smoothing),
        ("--pref-ftx", d.sft_weight),
        ("--dpoc-reference", d.reference),
    ]
    args += loss_args(d)
    if d.reference == "precomputed":
        args.append(("--dpoc-reference-micro-batch-size", d.reference_micro_batch_size))
    return args


def _lora_args(plan: Plan) -> list[Arg]:
    """The adapters (MindSpeed-LLM's flag names; targets in megatron-core's): only they train."""
    lora = plan.lora
    if lora is None:
        return []
    args: list[Arg] = [("--lora-r", lora.rank), ("--lora-alpha", lora.alpha), ("--lora-dropout", lora.dropout),
                       ("--lora-target-modules", lora.targets)]
    if lora.init_from is not None:
        args.append(("--lora-load", lora.init_from))
    return [*args, ("--dpoc-lora-experts", True)] if lora.experts else args


def _checkpoint_args(plan: Plan, resume: bool) -> list[Arg]:
    """Where checkpoints go, and where the weights come from: a resume, a converted start, or `init`."""
    ck = plan.checkpoint
    args: list[Arg] = [
        ("--ckpt-format", "torch_dist"),
        ("--save", ck.save),
        ("--save-interval", plan.training.save_interval),
        ("--dpoc-keep-checkpoints", ck.keep),
        ("--dpoc-init", ck.init),
    ]
    if ck.init == "hf":
        args.append(("--dpoc-hf-weights", ck.hf_weights))
    if ck.ref_model is not None:
        args.append(("--ref-model", ck.ref_model))
    if plan.lora is not None and ck.init == "converted":  # the frozen base, which a resume reads again
        args.append(("--dpoc-lora-base", ck.load))
    if resume:
        args.append(("--load", ck.save))
    elif ck.load is not None:
        args += [("--load", ck.load), ("--finetune", True), ("--no-load-optim", True), ("--no-load-rng", True)]
    return args


def loss_args(d: DPO) -> list[Arg]:
    """The loss parameters past MindSpeed-LLM's, each only where a chosen loss reads it."""
    args: list[Arg] = []
    if d.loss_weights:
        args.append(("--dpoc-loss-weights", d.loss_weights))
    if d.ld_alpha is not None:
        args.append(("--dpoc-ld-alpha", d.ld_alpha))
    if d.f_divergence_type != "reverse_kl":
        args.append(("--dpoc-f-divergence", d.f_divergence_type))
    if d.f_divergence_type == "alpha_divergence":
        args.append(("--dpoc-f-alpha", d.f_alpha_divergence_coef))
    if "discopop" in d.loss:
        args.append(("--dpoc-discopop-tau", d.discopop_tau))
    if "simpo" in d.loss:
        args.append(("--dpoc-simpo-gamma", d.simpo_gamma))
    if {"simpo", "cpo"} & set(d.loss):
        args.append(("--dpoc-cpo-alpha", d.cpo_alpha))
    if losses.unpaired(d.loss):
        args += [("--dpoc-kto-desirable-weight", d.kto_desirable_weight),
                 ("--dpoc-kto-undesirable-weight", d.kto_undesirable_weight)]
    return args


def restrict_search(space: SearchSpace) -> SearchSpace:
    """The planner searches only what megatron-core's local layers can run: no no-op layers; and no cp, which
    runs when pinned but whose key/value exchange the planner does not time yet."""
    return replace(space, cp=(1,), uneven=tuple(u for u in space.uneven if u != "noop_layers"))
