"""The MindSpeed-RL target: `torchrun cli/train_dpo.py --config-name ...` with a Hydra config + model YAML.

MindSpeed-RL turns every `MegatronConfig` attribute into a flag and aborts on unknown keys, so this emits
only known keys, scalars only (lists become one broken token), `ref_model` always set and `norm_epsilon`
always written (its Qwen3 model files leave it at 1e-5).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from dpoc.compiler.render import templating
from dpoc.compiler.render.conversions import MINDSPEED_DIR, mindspeed_conversions
from dpoc.compiler.render.targets import mindspeed_lora
from dpoc.compiler.resolve.rules import Violation
from dpoc.contract import losses
from dpoc.contract.family import DEFAULT_TEMPLATE
from dpoc.contract.plan import DPO, HardwareSpec, Plan
from dpoc.contract.requirements import Requirement
from dpoc.planner.features import GLOBAL_BATCH, Traits, kernel_features
from dpoc.planner.lengths import GLOBAL_BATCH_MULTIPLE

if TYPE_CHECKING:
    from dpoc.planner.search import SearchSpace

NAME = "mindspeed-rl"
# parallelism.cp_algo -> MindSpeed's context_parallel_algo (MindSpeed-RL's DPO supports these two)
CP_ALGO = {"ring": "megatron_cp_algo", "ulysses": "ulysses_cp_algo"}
DEFAULT_BETA, DEFAULT_ADAM_EPS = 0.1, 1e-8


def requirements() -> list[Requirement]:
    """What cli/train_dpo.py imports (MindSpeed-RL's install guide: torch 2.5.1 or 2.7.1; Megatron and MindSpeed
    are source copies on its PYTHONPATH, so only their presence is checked)."""
    return [Requirement("torch", "torch", (2, 5)), Requirement("megatron.core", "megatron-core"),
            Requirement("mindspeed", "mindspeed"), Requirement("mindspeed_rl", "mindspeed_rl"),
            Requirement("hydra", "hydra-core")]


def traits(hardware: HardwareSpec) -> Traits:
    """How the planner models this target: every micro-batch padded to its global batch's longest sequence
    (its DPO data loader), and MindSpeed's fp32 parameter reuse, which this target renders
    (`_layout_config`), on top of the NPU kernels' saved tensors; the LM head over every position of the row
    (MindSpeed-LLM's `DPOTrainer.loss_func` slices the response out of the whole sequence's logits)."""
    return Traits(NAME, GLOBAL_BATCH, replace(kernel_features(hardware.device), reuse_fp32_param=True),
                  response_head=False)


def node_script(rank: int) -> str:
    """Node `rank`'s launch script, relative to the build directory."""
    return f"mindspeed-rl/nodes/node-{rank}.sh"


def files(plan: Plan) -> dict[str, str]:
    """What this target renders: its folder of Hydra configs (fresh and resume), model and dataset YAML, one
    node script per node running cli/train_dpo.py, and MindSpeed-LLM's weight conversion."""
    name, m = plan.name, plan.model.mindspeed_name
    out = {}
    for resume, suffix in ((False, ""), (True, "_resume")):
        out[f"mindspeed-rl/dpo_{name}{suffix}.yaml"] = templating.yaml_text({
            "defaults": [{"model": [m]}],
            "megatron_training": training_config(plan, resume=resume),
        })
    out[f"mindspeed-rl/model/{m}.yaml"] = templating.yaml_text(model_config(plan))
    if plan.data.layout == "pairwise":  # MindSpeed-RL's preprocessing reads only pairwise columns
        out[f"mindspeed-rl/datasets/{name}.yaml"] = templating.yaml_text(dataset_config(plan))
    values = templating.node_values(plan)
    for rank, host in templating.node_hosts(plan):
        out[node_script(rank)] = templating.template("mindspeed_node.sh.j2", node_rank=rank, host=host, **values)
    for conv in mindspeed_conversions(plan):  # MindSpeed-LLM's weight conversion for exactly this layout
        out[f"{MINDSPEED_DIR}/{conv.file}"] = templating.template(
            "mindspeed_convert.sh.j2", title=conv.title, script=conv.script, args=conv.args, load_dir=conv.load_dir,
            save_dir=conv.save_dir, **templating.header_values(plan))
    return out


def unsupported(plan: Plan) -> list[Violation]:
    why = "MindSpeed-RL's DPO config (MegatronConfig) cannot set it"
    model, hardware, layout, training, dpo = plan.model, plan.hardware, plan.layout, plan.training, plan.dpo
    out = []
    if plan.checkpoint.init == "random":
        out.append(Violation("checkpoint.init", "random: MindSpeed-RL always loads converted per-rank weights for "
                             "policy and reference; valid: hf or converted (with model.hf_weights to convert, or "
                             "checkpoint.mindspeed_load), or runtime=dpoc"))
    elif plan.checkpoint.mindspeed_load is None:
        out.append(Violation("checkpoint.mindspeed_load", "not given, and no model.hf_weights to convert: MindSpeed-RL "
                             "loads MindSpeed-LLM's per-rank weights (valid: checkpoint.mindspeed_load, or "
                             "model.hf_weights)"))
    if hardware.device != "npu":
        out.append(
            Violation(
                "hardware.preset",
                f"MindSpeed-RL runs on Ascend NPUs only (hardware {hardware.name} "
                f"is {hardware.device}); valid: atlas-a2, atlas-a3, or runtime=dpoc",
            )
        )
    fixed_knobs = (
        ("training.warmup_iters", training.warmup_iters, 0),
        ("training.adam_eps", training.adam_eps, DEFAULT_ADAM_EPS),
        ("parallelism.etp", layout.etp if model.moe else layout.tp, layout.tp),
    )
    for field, value, fixed in fixed_knobs:
        if value != fixed:
            out.append(Violation(field, f"{value:g}: {why} (fixed at {fixed:g}); valid: {fixed:g}, or runtime=dpoc"))
    if training.packing:
        out.append(Violation("training.packing", "true: MindSpeed-RL's pairwise DPO data has no packing (each "
                             "micro-batch holds whole padded pairs); valid: false, or runtime=dpoc"))
    out += _loss_violations(dpo)
    out += _context_parallel_violations(plan)
    out += mindspeed_lora.unsupported(plan)
    if dpo.reference == "precomputed":
        out.append(Violation("dpo.reference", "precomputed: MindSpeed-LLM's DPO runs the frozen reference forward "
                             "in every step and reads no precomputed log-probs; valid: live, or runtime=dpoc"))
    if layout.recompute == "selective":
        out.append(Violation("parallelism.recompute", f"selective: {why}; valid: none, full, or runtime=dpoc"))
    if plan.source_of("checkpoint.keep").source.startswith("user"):
        out.append(Violation("checkpoint.keep", f"{plan.checkpoint.keep}: MindSpeed-RL keeps every checkpoint it "
                             "saves; valid: leave it unset, or runtime=dpoc"))
    return out


def _context_parallel_violations(plan: Plan) -> list[Violation]:
    """What MindSpeed and MindSpeed-LLM check of cp at start (the shared rules have seq_length % 2·cp and
    Ulysses' heads % cp·tp), and what the padding they then do leaves. MindSpeed's ring attention
    (`megatron_cp_algo`) splits every sequence into 2·cp load-balanced chunks; with `no_pad_to_seq_lengths`
    (dynamic padding) a batch is padded only to its longest sequence rounded up to the collator's 8 and to
    tp·cp (MindSpeed-RL sets pad_to_multiple_of = tp·cp), so that must be a multiple of 2·cp."""
    lay, out = plan.layout, []
    if lay.cp == 1 or not plan.training.dynamic_padding or lay.cp_algo != "ring":
        return out
    multiple = math.lcm(GLOBAL_BATCH_MULTIPLE, lay.tp * lay.cp)
    if multiple % (2 * lay.cp):
        out.append(Violation("parallelism.cp_algo", f"ring: MindSpeed's ring attention splits each sequence into "
                             f"2·cp = {2 * lay.cp} chunks, but with dynamic padding MindSpeed-RL pads a batch only "
                             f"to a multiple of lcm(8, tp·cp) = {multiple}; valid: cp_algo=ulysses, cp <= 4 or an "
                             "even tp, "
                             "or training.dynamic_padding=false"))
    return out


# MindSpeed-LLM's DPO knobs (dpoc field, MindSpeed-LLM's argument, its default) that MindSpeed-RL cannot pass: its
# MegatronConfig has no such field (Ascend/MindSpeed-RL master 05a90d7 and branches 2.0.0 to 2.3.0), it stops at a
# key it lacks, and it builds MindSpeed-LLM's whole command line from that config, so each stays at the default
MINDSPEED_LLM_ONLY = (("dpo.beta", "dpo_beta", DEFAULT_BETA), ("dpo.label_smoothing", "dpo_label_smoothing", 0.0),
                      ("dpo.sft_weight", "pref_ftx", 0.0))


def _loss_violations(dpo: DPO) -> list[Violation]:
    """MindSpeed-LLM's DPO has one loss of three, and none of TRL's generalisations; MindSpeed-RL passes it
    neither beta, label smoothing nor the SFT weight (`MINDSPEED_LLM_ONLY`)."""
    out = []
    for field, name, default in MINDSPEED_LLM_ONLY:
        value = getattr(dpo, field.removeprefix("dpo."))
        if value != default:
            out.append(Violation(field, f"{value:g}: MindSpeed-RL's DPO config (MegatronConfig) has no {name} field "
                                 f"(MindSpeed-LLM's --{name.replace('_', '-')}), so MindSpeed-LLM's default "
                                 f"{default:g} applies; valid: {default:g}, or runtime=dpoc"))
    theirs = [loss.name for loss in losses.LOSSES if loss.mindspeed]
    if len(dpo.loss) > 1 or dpo.loss[0] not in theirs:
        out.append(Violation("dpo.loss", f"{', '.join(dpo.loss)}: MindSpeed-LLM's DPO has one loss of "
                             f"{', '.join(theirs)}; valid: one of those, or runtime=dpoc"))
    for field, given in (("dpo.ld_alpha", dpo.ld_alpha is not None),
                         ("dpo.f_divergence_type", dpo.f_divergence_type != "reverse_kl")):
        if given:
            out.append(Violation(field, "MindSpeed-LLM's DPO has no such option; valid: leave it out, or runtime=dpoc"))
    return out


def model_config(plan: Plan) -> dict[str, Any]:
    """configs/model/<name>.yaml: the architecture, under one key named like the file."""
    m = plan.model
    cfg: dict[str, Any] = {
        "use_mcore_models": True,
        "num_layers": m.num_layers + len(plan.layout.noop_layers),
        "hidden_size": m.hidden_size,
        "ffn_hidden_size": m.ffn_hidden_size,
        "num_attention_heads": m.num_attention_heads,
        "group_query_attention": m.num_query_groups != m.num_attention_heads,
        "num_query_groups": m.num_query_groups,
        "kv_channels": m.head_dim,
        "max_position_embeddings": m.max_position_embeddings,
        "padded_vocab_size": m.vocab_size,
        "make_vocab_size_divisible_by": 1,
        "position_embedding_type": "rope",
        "use_rotary_position_embeddings": True,
        "rotary_base": int(m.rope_base),
        "normalization": "RMSNorm",
        "norm_epsilon": m.norm_epsilon,
        "swiglu": True,
        "disable_bias_linear": True,
        "add_qkv_bias": m.qkv_bias,
        "qk_layernorm": m.qk_layernorm,
        "untie_embeddings_and_output_weights": not m.tie_embeddings,
        "attention_softmax_in_fp32": True,
    }
    if m.moe is not None:
        cfg.update(
            {
                "num_experts": m.moe.num_experts,
                "moe_router_topk": m.moe.topk,
                "moe_ffn_hidden_size": m.moe.ffn_hidden_size,
                "moe_router_load_balancing_type": m.moe.load_balancing,
                "moe_aux_loss_coeff": m.moe.aux_loss_coeff,
                "norm_topk_prob": m.moe.norm_topk_prob,
            }
        )
        if m.moe.shared_expert_ffn_hidden_size:
            cfg["n_shared_experts"] = m.moe.shared_expert_ffn_hidden_size // m.moe.ffn_hidden_size
    return {m.mindspeed_name: _scalars(cfg)}


def training_config(plan: Plan, resume: bool) -> dict[str, Any]:
    """The `megatron_training` section of dpo_<name>.yaml."""
    lay, t, ck = plan.layout, plan.training, plan.checkpoint
    cfg: dict[str, Any] = {
        "model": plan.model.mindspeed_name,
        "use_mcore_models": True,
        "stage": "dpo",
        "is_pairwise_dataset": True,
        "dpo_loss_type": plan.dpo.loss[0],
        "no_pad_to_seq_lengths": t.dynamic_padding,
        "tokenizer_type": "PretrainedFromHF",
        "tokenizer_name_or_path": plan.data.tokenizer,
        "tokenizer_not_use_fast": True,
        "data_path": plan.data.output_prefix,
        "split": "100,0,0",
        "no_shuffle": False,
        **_optimizer_config(plan),
        **_kernel_config(plan),
        **_layout_config(plan),
        **mindspeed_lora.training_config(plan),
        "ref_model": ck.mindspeed_ref_model,
        "save": ck.save,
        "save_interval": t.save_interval,
        "log_interval": t.log_interval,
        "eval_interval": t.train_iters + 1,
        "eval_iters": 0,
        # every save is resumable: never no_save_optim / no_save_rng
    }
    if resume:
        cfg.update({"finetune": False, "load": ck.save, "no_load_optim": False, "no_load_rng": False})
    else:
        cfg.update({"finetune": True, "load": ck.mindspeed_load, "no_load_optim": True, "no_load_rng": True})
    cfg.update(_pipeline_config(plan))
    if lay.recompute == "full":
        cfg.update(
            {
                "recompute_granularity": "full",
                "recompute_method": lay.recompute_method,
                "recompute_num_layers": lay.recompute_num_layers,
            }
        )
    if plan.model.moe is not None:
        cfg.update(
            {
                "moe_token_dispatcher_type": lay.moe_dispatcher,
                "moe_grouped_gemm": lay.moe_grouped_gemm,
                "moe_permutation_async_comm": lay.moe_permutation_async_comm,
                "moe_alltoall_overlap_comm": lay.moe_alltoall_overlap_comm,
                "moe_tp_extend_ep": lay.moe_tp_extend_ep,
            }
        )
    return _scalars(cfg)


def _optimizer_config(plan: Plan) -> dict[str, Any]:
    """Batch, schedule and optimizer (MindSpeed-RL fixes warm-up and Adam's eps: see `unsupported`)."""
    lay, t = plan.layout, plan.training
    return {
        "seq_length": t.seq_length,
        "micro_batch_size": lay.micro_batch_size,
        "global_batch_size": lay.global_batch_size,
        "train_iters": t.train_iters,
        "lr": t.lr,
        "min_lr": t.min_lr,
        "lr_decay_style": t.lr_decay_style,
        "weight_decay": t.weight_decay,
        "clip_grad": t.clip_grad,
        "adam_beta1": t.adam_beta1,
        "adam_beta2": t.adam_beta2,
        "initial_loss_scale": 4096,
        "seed": t.seed,
        "bf16": t.precision == "bf16",
    }


def _kernel_config(plan: Plan) -> dict[str, Any]:
    """The model's numerics as MindSpeed computes them, and its fused Ascend kernels."""
    return {
        "norm_epsilon": plan.model.norm_epsilon,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "init_method_std": 0.02,
        "attention_softmax_in_fp32": True,
        "use_flash_attn": True,
        "use_fused_rmsnorm": True,
        "use_fused_swiglu": True,
        "use_fused_rotary_pos_emb": True,
        "no_masked_softmax_fusion": True,
        "no_gradient_accumulation_fusion": True,
        "attention_mask_type": "general",
    }


def _layout_config(plan: Plan) -> dict[str, Any]:
    """The parallel sizes and the distributed optimizer."""
    lay = plan.layout
    return {
        "tensor_model_parallel_size": lay.tp,
        "pipeline_model_parallel_size": lay.pp,
        "expert_model_parallel_size": lay.ep,
        "context_parallel_size": lay.cp,
        "context_parallel_algo": CP_ALGO[lay.cp_algo] if lay.cp > 1 else None,
        "sequence_parallel": lay.sequence_parallel,
        "use_distributed_optimizer": lay.distributed_optimizer,
        "overlap_grad_reduce": lay.distributed_optimizer,
        "reuse_fp32_param": traits(plan.hardware).features.reuses_fp32_param(lay, plan.training),
        "swap_attention": lay.swap_attention,
        "distributed_backend": "nccl",
    }


def _pipeline_config(plan: Plan) -> dict[str, Any]:
    """Interleaving, an uneven pipeline and its no-op layers, as MindSpeed's comma-separated scalars."""
    lay = plan.layout
    cfg: dict[str, Any] = {}
    if lay.vpp > 1:
        cfg["num_layers_per_virtual_pipeline_stage"] = lay.stage_layers[0] // lay.vpp
    if lay.num_layer_list is not None:
        cfg["num_layer_list"] = ",".join(map(str, lay.num_layer_list))
    if lay.noop_layers:
        cfg["noop_layers"] = ",".join(map(str, lay.noop_layers))
    return cfg


def dataset_config(plan: Plan) -> dict[str, Any]:
    """configs/datasets/<name>.yaml for MindSpeed-RL's cli/preprocess_data.py."""
    d = plan.data
    prompt_type = {"qwen3": "qwen3", "qwen": "qwen", "chatml": "qwen", "llama3": "llama3", "default": "default"}
    template = DEFAULT_TEMPLATE[plan.model.family] if d.template == "tokenizer" else d.template
    return _scalars(
        {
            "input": d.input,
            "tokenizer_type": "HuggingFaceTokenizer",
            "tokenizer_name_or_path": d.tokenizer,
            "tokenizer_not_use_fast": True,
            "output_prefix": d.output_prefix,
            "handler_name": "AlpacaStylePairwiseHandler",
            "workers": d.workers,
            "log_interval": 1000,
            "prompt_type": prompt_type[template],
            "enable_thinking": d.enable_thinking,
            "seq_length": plan.training.seq_length,
        }
    ) | {"map_keys": dict(d.map_keys)}


def _scalars(cfg: dict[str, Any]) -> dict[str, Any]:
    """MindSpeed-RL emits False/None as nothing; drop them so the file shows only what takes effect."""
    return {k: v for k, v in cfg.items() if v is not None and v is not False}


def restrict_search(space: SearchSpace) -> SearchSpace:
    """MindSpeed-RL cannot set expert tensor parallelism: experts are split like attention (etp = tp)."""
    from dpoc.planner.search import SAME_AS_TP

    return replace(space, etp=(SAME_AS_TP,))
