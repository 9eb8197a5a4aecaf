"""megatron-core GPTModel (local layer spec) for Qwen3 dense and Qwen3-MoE, from parsed megatron.args."""

from __future__ import annotations

import argparse
import copy
import functools

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from dpoc.contract.errors import DpocError, Problem
from dpoc.contract.kernels import EXPERTS, FUSED
from dpoc.runtime.model.attention import core_attention_class
from dpoc.runtime.model.device import Device, attention_kernel, experts_kernel
from dpoc.runtime.model.experts import experts_class
from dpoc.runtime.model.fused import NpuRMSNorm, NpuSwiGLU
from dpoc.runtime.step.data import IGNORE_INDEX


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def transformer_config(args: argparse.Namespace, device: Device) -> TransformerConfig:
    """Every architectural and layout knob from the args; kernel fusions only where the device has them."""
    dtype = params_dtype(args)
    jit = device.kind == "cuda"  # megatron's fused kernels are CUDA (jit/triton)
    moe = bool(args.num_experts)
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=not args.disable_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=args.qk_layernorm,
        init_method_std=args.init_method_std,
        attention_dropout=args.attention_dropout,
        hidden_dropout=args.hidden_dropout,
        num_moe_experts=args.num_experts if moe else None,
        moe_router_topk=args.moe_router_topk,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size if moe else None,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_grouped_gemm=False,  # megatron's GroupedMLP needs the CUDA-only grouped_gemm package: see experts.py
        moe_permute_fusion=False,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size(args),
        pipeline_model_parallel_layout=pipeline_layout(args),
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        sequence_parallel=args.sequence_parallel,
        context_parallel_size=args.context_parallel_size,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=args.bf16,
        fp16=args.fp16,
        use_cpu_initialization=device.kind == "cpu",
        gradient_accumulation_fusion=False,
        bias_activation_fusion=jit and not moe,
        bias_dropout_fusion=jit,
        # builds the MLPs' activation from the layer spec (fused.NpuSwiGLU, see block_spec); nothing of TE
        use_te_activation_func=args.swiglu and "swiglu" in FUSED[device.kind],
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        # micro-batches are padded to their own longest pair, so pipeline messages change shape; the
        # interleaved schedule's shape exchange mismatches on gloo with pp=2 (one peer both ways), so
        # there every micro-batch of a step gets one length instead (see uniform_micro_batch_length)
        variable_seq_lengths=not uniform_micro_batch_length(args),
        # gloo matches a batched send/recv pair crosswise when both neighbours are one peer (pp=2)
        batch_p2p_comm=not _gloo_interleaved(args) or args.pipeline_model_parallel_size > 2,
        deallocate_pipeline_outputs=True,
    )


def uniform_micro_batch_length(args: argparse.Namespace) -> bool:
    """One length for every micro-batch of a step: the gloo workaround for the interleaved pipeline only."""
    return _gloo_interleaved(args)


def _gloo_interleaved(args: argparse.Namespace) -> bool:
    """An interleaved (virtual) pipeline over gloo, the case gloo's point-to-point traps need working around;
    hccl and nccl take variable shapes and batched p2p."""
    return args.distributed_backend == "gloo" and virtual_pipeline_size(args) is not None


def _lora_problems(args: argparse.Namespace, args_file: str) -> list[Problem]:
    if args.lora_r is None:
        return [] if args.lora_load is None else [Problem(args_file, "--lora-load", f"{args.lora_load}: initial "
                                                          "adapters need LoRA on (valid: --lora-r and --lora-alpha "
                                                          "with it, or drop it)")]
    out = []
    if args.lora_r < 1 or args.lora_alpha is None or args.lora_alpha <= 0:
        out.append(Problem(args_file, "--lora-r", f"LoRA needs a rank >= 1 and --lora-alpha > 0 (got r={args.lora_r}, "
                           f"alpha={args.lora_alpha})"))
    return out


def check_supported(args: argparse.Namespace, args_file: str) -> None:
    problems = []
    kernel = attention_kernel(args.dpoc_device, args.dpoc_core_attention, args_file)
    if args.context_parallel_size > 1 and kernel not in ("sdpa", "npu-fusion"):
        problems.append(Problem(
            args_file, "--context-parallel-size",
            f"{args.context_parallel_size}: the runtime's context parallelism runs on its sdpa and npu-fusion "
            f"attention, not {kernel} (valid: 1, or --dpoc-core-attention sdpa on cpu or cuda, npu-fusion on npu)"))
    if args.num_layer_list:
        counts = [int(n) for n in args.num_layer_list.split(",")]
        if (len(counts) != args.pipeline_model_parallel_size or sum(counts) != args.num_layers
                or min(counts) < 1 or args.num_layers_per_virtual_pipeline_stage is not None):
            problems.append(Problem(
                args_file, "--num-layer-list",
                f"{args.num_layer_list} must give each of the {args.pipeline_model_parallel_size} pipeline "
                f"stages at least one layer, {args.num_layers} layers in all, without a virtual pipeline "
                f"(got {len(counts)} stages, {sum(counts)} layers)"))
    if args.num_experts and args.tensor_model_parallel_size > 1 and not args.sequence_parallel:
        problems.append(Problem(
            args_file, "--sequence-parallel",
            f"megatron-core refuses MoE with tensor parallelism (tp={args.tensor_model_parallel_size}) "
            "without sequence parallelism (valid: set the flag)"))
    if args.dpoc_packing and args.dpoc_core_attention == "local":
        problems.append(Problem(
            args_file, "--dpoc-core-attention",
            "local: megatron-core's DotProductAttention cannot attend packed sequences (--dpoc-packing; valid: "
            "auto, or the device's fused kernel)"))
    if args.dpoc_reference == "live" and args.dpoc_reference_micro_batch_size is not None:
        problems.append(Problem(
            args_file, "--dpoc-reference-micro-batch-size",
            f"{args.dpoc_reference_micro_batch_size}: sizes the precompute pass, which --dpoc-reference live does "
            "not run (valid: drop it, or --dpoc-reference precomputed)"))
    problems += _lora_problems(args, args_file)
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        problems.append(Problem(
            args_file, "--overlap-param-gather",
            "defers the distributed optimizer's parameter all-gather, and this run has none (valid: add "
            "--use-distributed-optimizer, or drop it)"))
    if args.attention_dropout:
        problems.append(Problem(
            args_file, "--attention-dropout",
            f"the runtime's attention kernels (SDPA, npu_fusion_attention) run without dropout "
            f"(got {args.attention_dropout:g}; valid: 0)"))
    if args.dpoc_moe_experts and args.dpoc_moe_experts not in EXPERTS[args.dpoc_device]:
        problems.append(Problem(
            args_file, "--dpoc-moe-experts",
            f"{args.dpoc_moe_experts} does not run on --dpoc-device {args.dpoc_device} "
            f"(valid: {', '.join(EXPERTS[args.dpoc_device])})"))
    if args.num_experts and not args.disable_bias_linear:
        problems.append(Problem(
            args_file, "--disable-bias-linear",
            "MoE expert MLPs need bias-free linear layers in megatron-core 0.16 (valid: set the flag)"))
    if problems:
        raise DpocError(problems)


def virtual_pipeline_size(args: argparse.Namespace) -> int | None:
    per_chunk = args.num_layers_per_virtual_pipeline_stage
    if per_chunk is None:
        return None
    return args.num_layers // (args.pipeline_model_parallel_size * per_chunk)


def pipeline_layout(args: argparse.Namespace) -> list[list[str]] | None:
    """`--num-layer-list a,b,c` (MindSpeed's uneven pipeline) as megatron-core's explicit stage layout."""
    if not args.num_layer_list:
        return None
    counts = [int(n) for n in args.num_layer_list.split(",")]
    stages = [["decoder"] * n for n in counts]
    stages[0].insert(0, "embedding")
    stages[-1].append("loss")
    return stages


class _TorchNorm:
    """torch's RMSNorm/LayerNorm, built whatever the sequence-parallel setting: megatron's wrapper refuses
    sequence parallelism only because it cannot mark the weights; q/k norms act on heads, never sharded.
    `fused`: RMSNorm through the device's fused kernel (fused.NpuRMSNorm, same weight)."""

    fused = False

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object):
        rms = NpuRMSNorm if cls.fused else torch.nn.RMSNorm
        norm = rms if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        return norm(hidden_size, eps=eps)


class _SequenceShardedNorm(_TorchNorm):
    """A norm over the hidden states: with sequence parallelism each TP rank sees a slice of the sequence,
    so its weight's gradient is summed over TP (finalize_model_grads does that for `sequence_parallel`)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object):
        norm = super().__new__(cls, config, hidden_size, eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


@functools.cache
def norm_class(sequence_sharded: bool, fused: bool) -> type:
    """The norm the layer spec builds: over the hidden states (sharded along the sequence) or over heads."""
    base = _SequenceShardedNorm if sequence_sharded else _TorchNorm
    return type(f"{base.__name__}[npu_rms_norm]", (base,), {"fused": True}) if fused else base


def block_spec(config: TransformerConfig, vp_stage: int | None, core_attention: str,
               experts: str = "sequential", fused: tuple[str, ...] = ()) -> TransformerBlockSubmodules:
    """megatron-core's local layer spec with torch norms, the device's core-attention kernel, its MoE experts
    kernel (`experts.experts_class`) and its `fused` kernels (`kernels.FUSED`, `fused.py`)."""
    layer = copy.deepcopy(get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm,
        qk_layernorm=config.qk_layernorm, normalization=config.normalization))
    hidden_norm = norm_class(True, "rms-norm" in fused)
    layer.submodules.input_layernorm = hidden_norm
    layer.submodules.pre_mlp_layernorm = hidden_norm
    mlp = layer.submodules.mlp.submodules
    if config.num_moe_experts and not config.moe_grouped_gemm:
        mlp.experts.module = experts_class(experts)
    if config.use_te_activation_func:  # set by transformer_config where `swiglu` is fused
        mlps = [mlp.experts, mlp.shared_experts] if config.num_moe_experts else [layer.submodules.mlp]
        for spec in filter(None, mlps):
            spec.submodules.activation_func = NpuSwiGLU
    attention = layer.submodules.self_attention.submodules
    attention.core_attention = core_attention_class(core_attention)
    if config.qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = norm_class(False, "rms-norm" in fused)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * count, layer_norm=hidden_norm)


class ResponseLogitsGPTModel(GPTModel):
    """megatron-core's GPTModel whose last stage projects through the output layer, and takes the cross
    entropy of, only the positions that predict a response token (labels other than IGNORE_INDEX): DPO
    never reads a prompt's or a padding position's log-prob, and the LM head is a large share of a step
    (here about 40% of the matmul FLOPs; Qwen3's 151k vocabulary makes it large on the real models too).
    The per-token losses come back as GPTModel's [b, s], zero at the skipped positions, so every caller
    reads them as before. With sequence parallelism the sequence is gathered first (its gradient only
    split back: the output layer, then not sequence-parallel, all-reduces it), as megatron-core's own
    last-token inference path does."""

    def _postprocess(self, hidden_states, labels=None, **kwargs):
        if labels is None or not self.post_process or self.mtp_process or self.config.mtp_num_layers:
            return super()._postprocess(hidden_states=hidden_states, labels=labels, **kwargs)
        head = self.output_layer
        gathered = head.sequence_parallel
        if gathered:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
        keep = (labels != IGNORE_INDEX).transpose(0, 1)  # [s, b], as the hidden states [s, b, h]
        head.sequence_parallel = False
        try:
            picked = super()._postprocess(hidden_states=hidden_states[keep].unsqueeze(1),
                                          labels=labels.transpose(0, 1)[keep].unsqueeze(0), **kwargs)  # [1, n]
        finally:
            head.sequence_parallel = gathered
        return picked.new_zeros(keep.shape).masked_scatter(keep, picked[0]).transpose(0, 1)


def build_chunks(config: TransformerConfig, args: argparse.Namespace, experts: str | None = None) -> list[GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), in float32/bf16 on the current device, with
    the core attention `--dpoc-core-attention` names (`auto`: the device's, `device.attention_kernel`) and,
    with `--moe-grouped-gemm`, the device's grouped experts (`experts` overrides the kernel)."""
    kernel = attention_kernel(args.dpoc_device, args.dpoc_core_attention)
    experts = experts or expert_path(args)
    chunks = []
    vpp = config.virtual_pipeline_model_parallel_size
    for stage in range(vpp or 1):
        vp_stage = stage if vpp else None
        chunks.append(ResponseLogitsGPTModel(
            config=config,
            transformer_layer_spec=block_spec(config, vp_stage, kernel, experts, FUSED[args.dpoc_device]),
            vocab_size=args.padded_vocab_size,
            max_sequence_length=args.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=args.rotary_base,
            vp_stage=vp_stage,
        ))
    return chunks


def expert_path(args: argparse.Namespace) -> str:
    """The experts kernel this run uses: the Plan's (`--dpoc-moe-experts`), or without it the device's
    (`kernels.EXPERTS`) when `--moe-grouped-gemm` asks for grouped GEMM, else SequentialMLP's loop; `-` for a
    dense model."""
    if not args.num_experts:
        return "-"
    if args.dpoc_moe_experts:
        return experts_kernel(args.dpoc_device, args.dpoc_moe_experts)
    return experts_kernel(args.dpoc_device) if args.moe_grouped_gemm else "sequential"
