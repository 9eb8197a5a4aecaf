"""LoRA for the MindSpeed-RL target: what MindSpeed-RL's `MegatronConfig` and MindSpeed-LLM's LoRA can say.

MindSpeed-LLM wraps the model with PEFT (`LoraConfig(r, lora_alpha, target_modules, lora_dropout=0.0)`) when
`--lora-target-modules` is given; its flags are `--lora-r` and `--lora-alpha` (both parsed as int) and
`--lora-fusion` (CCLoRA: the adapters' matmuls overlapped with the tensor-parallel communication, so it only
does something at tp > 1). MindSpeed-RL turns each config value into flags, a list becoming one broken token
(`"['linear_qkv', 'linear_proj']"`), so `lora_target_modules` can only be one name. On a MoE model its LoRA
needs the `alltoall_seq` dispatcher and no `moe_tp_extend_ep`, and PEFT's name match adapts every expert's
linear_fc1/fc2. Its DPO trainer builds the reference as a second model (not the policy with adapters off).
Checkpoints keep base and adapters together (`lora_ckpt_filter` off), so resume loads `save` as today and
MindSpeed-LLM's mg -> hf conversion merges the adapters (`--lora-r --lora-alpha --lora-target-modules`).
"""

from __future__ import annotations

from typing import Any

from dpoc.compiler.resolve.rules import Violation
from dpoc.contract.plan import Plan


def unsupported(plan: Plan) -> list[Violation]:
    """What of `plan.lora` MindSpeed-RL cannot express, each with the reason."""
    lora, out = plan.lora, []
    if lora is None:
        return out
    if len(lora.targets) > 1:
        out.append(Violation("lora.targets", f"{', '.join(lora.targets)}: MindSpeed-RL passes a list to MindSpeed-LLM "
                             "as one broken argument (\"['linear_qkv', ...]\"), so its lora_target_modules can hold "
                             "one linear; valid: one of them, or runtime=dpoc"))
    if lora.alpha != int(lora.alpha):
        out.append(Violation("lora.alpha", f"{lora.alpha:g}: MindSpeed-LLM parses --lora-alpha as an integer; valid: "
                             "an integer, or runtime=dpoc"))
    if lora.dropout:
        out.append(Violation("lora.dropout", f"{lora.dropout:g}: MindSpeed-LLM's LoRA has no dropout (fixed at 0); "
                             "valid: 0, or runtime=dpoc"))
    if lora.init_from is not None:
        out.append(Violation("lora.init_from", "MindSpeed-LLM loads its own per-rank LoRA checkpoints, not a PEFT "
                             "adapter directory; valid: leave it out, or runtime=dpoc"))
    if plan.model.moe is not None:
        if plan.layout.moe_dispatcher != "alltoall_seq":
            out.append(Violation("parallelism.moe_dispatcher", f"{plan.layout.moe_dispatcher}: MindSpeed-LLM's LoRA on "
                                 "a MoE model needs alltoall_seq; valid: alltoall_seq, or runtime=dpoc"))
        if plan.layout.moe_tp_extend_ep:
            out.append(Violation("parallelism.moe_tp_extend_ep", "true: MindSpeed-LLM's LoRA refuses it; valid: "
                                 "false, or runtime=dpoc"))
    return out


def training_config(plan: Plan) -> dict[str, Any]:
    """The `megatron_training` keys that turn MindSpeed-LLM's LoRA on (none without `plan.lora`)."""
    lora = plan.lora
    if lora is None:
        return {}
    return {"lora_r": lora.rank, "lora_alpha": int(lora.alpha), "lora_target_modules": lora.targets[0],
            "lora_fusion": plan.layout.tp > 1}
