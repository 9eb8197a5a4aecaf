"""The `megatron.args` format: one place that both writes it (compiler) and reads it (runtime).

Flag names are Megatron-LM's where Megatron has the knob, MindSpeed-LLM's for DPO and a few MindSpeed
extensions, `--dpoc-...` for what neither has. The compiler only emits flags this parser knows (a test
parses every rendered file with it), so the runtime can never be handed a flag it silently ignores.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from dpoc.contract import losses
from dpoc.contract.lora import MCORE_TARGETS

if TYPE_CHECKING:
    from argparse import _ArgumentGroup as _Group  # what add_argument_group returns

    from dpoc.contract.architecture import Architecture

Arg = tuple[str, object]  # ("--flag", value); value True means a lone flag


class _ArgsFileParser(argparse.ArgumentParser):
    def convert_arg_line_to_args(self, arg_line: str) -> list[str]:
        return shlex.split(arg_line, comments=True)

    def error(self, message: str):  # argparse exits 2 too; keep its message, drop the usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str = "dpoc.runtime.train", require_job: bool = True) -> argparse.ArgumentParser:
    """The runtime's parser. `require_job=False` makes only the model's flags required, for tools that build
    the model without training it (the weight converter)."""
    p = _ArgsFileParser(prog=prog, fromfile_prefix_chars="@", allow_abbrev=False)
    for title, add_flags in _GROUPS:
        add_flags(p.add_argument_group(title), {"required": require_job})
    return p


_SWITCH: dict[str, Any] = {"action": "store_true"}


def _model_flags(g: _Group, job: dict[str, bool]) -> None:
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--ffn-hidden-size", type=int, required=True)
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--group-query-attention", **_SWITCH)
    g.add_argument("--num-query-groups", type=int, default=None)
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--max-position-embeddings", type=int, required=True)
    g.add_argument("--position-embedding-type", choices=["rope"], default="rope")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--normalization", choices=["RMSNorm", "LayerNorm"], default="RMSNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", **_SWITCH)
    g.add_argument("--disable-bias-linear", **_SWITCH)
    g.add_argument("--add-qkv-bias", **_SWITCH)
    g.add_argument("--qk-layernorm", **_SWITCH)
    g.add_argument("--untie-embeddings-and-output-weights", **_SWITCH)
    g.add_argument("--padded-vocab-size", type=int, required=True)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--hidden-dropout", type=float, default=0.0)


def _moe_flags(g: _Group, job: dict[str, bool]) -> None:
    g.add_argument("--num-experts", type=int, default=None)
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None)
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    g.add_argument("--moe-router-load-balancing-type", choices=["aux_loss", "seq_aux_loss", "none"],
                   default="aux_loss")
    g.add_argument("--moe-router-pre-softmax", **_SWITCH)
    g.add_argument("--moe-token-dispatcher-type", choices=["allgather", "alltoall"], default="alltoall")
    g.add_argument("--moe-grouped-gemm", **_SWITCH)


def _parallelism_flags(g: _Group, job: dict[str, bool]) -> None:
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--num-layer-list", type=str, default=None,
                   help="comma-separated transformer layers per pipeline stage (MindSpeed-LLM)")
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None)
    g.add_argument("--sequence-parallel", **_SWITCH)
    g.add_argument("--use-distributed-optimizer", **_SWITCH)
    g.add_argument("--overlap-param-gather", **_SWITCH)
    g.add_argument("--distributed-backend", choices=["gloo", "nccl", "hccl"], default="nccl")
    g.add_argument("--dpoc-device", choices=["cpu", "cuda", "npu"], default="cuda")
    g.add_argument("--dpoc-core-attention", choices=["auto", "sdpa", "npu-fusion", "te", "local"],
                   default="auto",
                   help="core-attention kernel; auto: the device's fastest (dpoc.runtime.model.device)")
    g.add_argument("--dpoc-moe-experts", choices=["sequential", "torch-grouped-mm", "npu-gmm"], default=None,
                   help="the MoE experts kernel the Plan chose (layout.moe_experts); default: the device's grouped "
                   "GEMM with --moe-grouped-gemm, else sequential")


def _training_flags(g: _Group, job: dict[str, bool]) -> None:
    g.add_argument("--micro-batch-size", type=int, **job, help="pairs per micro-batch")
    g.add_argument("--global-batch-size", type=int, **job, help="pairs per step")
    g.add_argument("--seq-length", type=int, **job)
    g.add_argument("--train-iters", type=int, **job)
    g.add_argument("--lr", type=float, **job)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="constant")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", **_SWITCH)
    g.add_argument("--fp16", **_SWITCH)
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--no-pad-to-seq-lengths", **_SWITCH,
                   help="pad each micro-batch to its longest sequence rounded to tp*cp, not to --seq-length")
    g.add_argument("--dpoc-packing", **_SWITCH,
                   help="pack several pairs per micro-batch into one token stream of at most "
                        "2 x micro-batch-size x seq-length tokens (dpoc.contract.packing)")


def _data_flags(g: _Group, job: dict[str, bool]) -> None:
    g.add_argument("--data-path", type=str, **job, help="dataset prefix, without _packed")
    g.add_argument("--tokenizer-type", choices=["PretrainedFromHF"], default="PretrainedFromHF")
    g.add_argument("--tokenizer-name-or-path", type=str, default=None)
    g.add_argument("--is-pairwise-dataset", **_SWITCH)


def _checkpoint_flags(g: _Group, job: dict[str, bool]) -> None:
    g.add_argument("--load", type=str, default=None)
    g.add_argument("--save", type=str, default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--finetune", **_SWITCH)
    g.add_argument("--no-load-optim", **_SWITCH)
    g.add_argument("--no-load-rng", **_SWITCH)
    g.add_argument("--ckpt-format", choices=["torch_dist"], default="torch_dist")
    g.add_argument("--ref-model", type=str, default=None,
                   help="the frozen reference's weights: a Hugging Face directory or a distributed checkpoint")
    g.add_argument("--dpoc-init", choices=["random", "hf", "converted"], default=None,
                   help="where the policy's initial weights come from: a seeded random init, --dpoc-hf-weights, "
                        "or the distributed checkpoint --load (with --finetune)")
    g.add_argument("--dpoc-hf-weights", type=str, default=None, help="Hugging Face weights directory")
    g.add_argument("--dpoc-keep-checkpoints", type=int, default=2, help="newest complete checkpoints kept")


def _dpo_flags(g: _Group, job: dict[str, bool]) -> None:
    g.add_argument("--stage", choices=["dpo"], **job)
    g.add_argument("--dpo-loss-type", type=_loss_names, default=("sigmoid",),
                   help="one loss, or several separated by commas, added with --dpoc-loss-weights "
                        "(dpoc.contract.losses)")
    g.add_argument("--dpoc-loss-weights", type=_floats, default=(), help="one per loss, by commas (default: 1 each)")
    g.add_argument("--dpo-beta", type=float, default=0.1)
    g.add_argument("--dpo-label-smoothing", type=float, default=0.0)
    g.add_argument("--pref-ftx", type=float, default=0.0, help="weight of the SFT loss on chosen (RPO's alpha)")
    g.add_argument("--dpoc-ld-alpha", type=float, default=None,
                   help="LD-DPO: weight of the log-probs past the shorter response of each pair")
    g.add_argument("--dpoc-f-divergence", choices=losses.F_DIVERGENCES, default="reverse_kl")
    g.add_argument("--dpoc-f-alpha", type=float, default=losses.DEFAULT_F_ALPHA)
    g.add_argument("--dpoc-discopop-tau", type=float, default=losses.DEFAULT_DISCOPOP_TAU)
    g.add_argument("--dpoc-simpo-gamma", type=float, default=losses.DEFAULT_SIMPO_GAMMA)
    g.add_argument("--dpoc-cpo-alpha", type=float, default=0.0, help="weight of the chosen NLL of cpo and simpo")
    g.add_argument("--dpoc-kto-desirable-weight", type=float, default=1.0, help="kto: the desirable losses' weight")
    g.add_argument("--dpoc-kto-undesirable-weight", type=float, default=1.0,
                   help="kto: the undesirable losses' weight")
    g.add_argument("--dpoc-reference", choices=["live", "precomputed", "none"], default="live",
                   help="live: the frozen reference's forward in every step; precomputed: its log-probs read from "
                        "<data-path>_reference-<key>.npz, written by `python -m dpoc.runtime.precompute` "
                        "(dpoc.runtime.reference.reference_file); none: a reference-free loss, no reference at all")
    g.add_argument("--dpoc-reference-micro-batch-size", type=int, default=None,
                   help="pairs per forward of the precompute pass (default: --micro-batch-size)")


def _lora_flags(g: _Group, job: dict[str, bool]) -> None:
    g.add_argument("--lora-r", type=int, default=None, help="LoRA rank; given, only adapters train (base frozen)")
    g.add_argument("--lora-alpha", type=float, default=None, help="the adapters' update is (alpha / r) B A")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    g.add_argument("--lora-target-modules", type=_lora_targets, default=MCORE_TARGETS,
                   help=f"megatron-core linears that get adapters, by commas (of {', '.join(MCORE_TARGETS)})")
    g.add_argument("--dpoc-lora-experts", **_SWITCH, help="routed MoE experts get adapters too (one per expert)")
    g.add_argument("--lora-load", type=str, default=None,
                   help="a PEFT adapter directory: the policy's initial adapters, and (frozen) the reference's")
    g.add_argument("--dpoc-lora-base", type=str, default=None,
                   help="with --dpoc-init converted: the frozen base's distributed checkpoint (the --load of the "
                        "start), which a resume reads again (--load then names the save directory)")


def _logging_flags(g: _Group, job: dict[str, bool]) -> None:
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", type=str, default=None)
    g.add_argument("--dpoc-run-dir", type=str, **job)
    g.add_argument("--dpoc-plan-hash", type=str, default=None)
    g.add_argument("--dpoc-measure-memory", **_SWITCH,
                   help="count this rank's memory on step 1 into <run-dir>/memory/rank-<r>.json, then stop")


_GROUPS: tuple[tuple[str, Callable[[_Group, dict[str, bool]], None]], ...] = (
    ("model", _model_flags),
    ("mixture of experts", _moe_flags),
    ("parallelism", _parallelism_flags),
    ("training", _training_flags),
    ("data", _data_flags),
    ("checkpoint", _checkpoint_flags),
    ("dpo", _dpo_flags),
    ("lora", _lora_flags),
    ("logging", _logging_flags),
)


def _loss_names(text: str) -> tuple[str, ...]:
    names = tuple(text.split(","))
    unknown = [n for n in names if n not in losses.TRAINED]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown loss {unknown[0]!r} (valid: {', '.join(losses.TRAINED)})")
    if losses.unpaired(names) and len(names) > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: kto trains on unpaired completions and cannot be added to "
                                         "other losses (valid: kto alone)")
    return names


def _lora_targets(text: str) -> tuple[str, ...]:
    names = tuple(text.split(","))
    unknown = [n for n in names if n not in MCORE_TARGETS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown LoRA target {unknown[0]!r} (valid: {', '.join(MCORE_TARGETS)})")
    return names


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


# what defines the model's tensors: the model and MoE groups, less how the experts are computed
_ARCHITECTURE_GROUPS = ("model", "mixture of experts")
_EXECUTION_CHOICES = ("moe_token_dispatcher_type", "moe_grouped_gemm")


def architecture(args: argparse.Namespace) -> dict[str, object]:
    """The architecture flags' values (by argparse dest), e.g. to tell whether a checkpoint holds this model."""
    groups = [g for g in build_parser()._action_groups if g.title in _ARCHITECTURE_GROUPS]
    return {a.dest: getattr(args, a.dest) for g in groups for a in g._group_actions
            if a.dest not in _EXECUTION_CHOICES}


def format_args(args: Iterable[Arg]) -> str:
    """Render `(flag, value)` pairs as the file's lines; values are shell-quoted so paths stay literal."""
    lines = []
    for name, value in args:
        if value is True:
            lines.append(name)
        else:
            lines.append(f"{name} {shlex.quote(format_value(value))}")
    return "\n".join(lines) + "\n"


def format_value(value: object) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def parse(argv: Sequence[str], require_job: bool = True) -> argparse.Namespace:
    return build_parser(require_job=require_job).parse_args(list(argv))


def resuming(args: argparse.Namespace) -> bool:
    """Megatron's convention: `--load` alone resumes a training checkpoint (model, optimizer, RNG, step);
    `--load` with `--finetune` only starts the policy from those weights."""
    return bool(args.load) and not args.finetune

def model_args(m: Architecture) -> list[Arg]:
    """The architecture's flags: what a weights directory must match (dpoc.contract.hf_config checks them)."""
    args: list[Arg] = [
        ("--num-layers", m.num_layers),
        ("--hidden-size", m.hidden_size),
        ("--ffn-hidden-size", m.ffn_hidden_size),
        ("--num-attention-heads", m.num_attention_heads),
    ]
    if m.num_query_groups != m.num_attention_heads:
        args += [("--group-query-attention", True), ("--num-query-groups", m.num_query_groups)]
    args += [
        ("--kv-channels", m.head_dim),
        ("--max-position-embeddings", m.max_position_embeddings),
        ("--position-embedding-type", "rope"),
        ("--rotary-base", int(m.rope_base)),
        ("--normalization", "RMSNorm"),
        ("--norm-epsilon", m.norm_epsilon),
        ("--swiglu", True),
        ("--disable-bias-linear", True),
    ]
    args += [(flag, True) for flag, on in (("--add-qkv-bias", m.qkv_bias), ("--qk-layernorm", m.qk_layernorm),
                                           ("--untie-embeddings-and-output-weights", not m.tie_embeddings)) if on]
    args += [("--padded-vocab-size", m.vocab_size), ("--make-vocab-size-divisible-by", 1),
             ("--attention-dropout", 0.0), ("--hidden-dropout", 0.0)]
    if m.moe is not None:
        args += [
            ("--num-experts", m.moe.num_experts),
            ("--moe-router-topk", m.moe.topk),
            ("--moe-ffn-hidden-size", m.moe.ffn_hidden_size),
            ("--moe-aux-loss-coeff", m.moe.aux_loss_coeff),
            ("--moe-router-load-balancing-type", m.moe.load_balancing),
        ]
        if m.moe.shared_expert_ffn_hidden_size:
            args.append(("--moe-shared-expert-intermediate-size", m.moe.shared_expert_ffn_hidden_size))
        if not m.moe.norm_topk_prob:
            args.append(("--moe-router-pre-softmax", True))
    return args
