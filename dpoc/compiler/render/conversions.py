"""Weight-conversion commands of a build: dpoc's own converter for the dpoc runtime (`convert/`), and
MindSpeed-LLM's for exactly the Plan's layout for the MindSpeed-RL target (`mindspeed-rl/convert/`). The two
formats never share a folder: dpoc's writes `checkpoint.load`, MindSpeed-LLM's `checkpoint.mindspeed_load`.

dpoc's converter writes a megatron-core distributed checkpoint, which loads at any layout, so its command
knows no layout. MindSpeed-LLM checkpoints are per rank, so that converter must be told the training
layout: tp, pp, ep, vpp, the layer list or no-op layers, grouped GEMM and — the classic trap —
`--moe-tp-extend-ep` exactly when training sets it (else the experts are laid out differently and the
model produces garbage). A LoRA run's trained checkpoint goes back merged (`--lora-*`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from dpoc.contract.plan import Plan

DPOC_DIR, MINDSPEED_DIR = "convert", "mindspeed-rl/convert"


@dataclass(eq=False, repr=False)  # an intermediate: not frozen, compared by identity, no repr (one method to compile)
class DpocConversion:
    """One `dpoc convert` script of the build."""
    file: str  # under convert/
    title: str
    direction: str  # hf-to-mcore | mcore-to-hf (`dpoc convert DIRECTION SOURCE OUT`)
    source: str
    out: str
    tokenizer: str | None  # mcore-to-hf: tokenizer files to copy next to the weights


def dpoc_conversions(plan: Plan) -> list[DpocConversion]:
    """The dpoc runtime's: HF → distributed checkpoint when the policy starts from converted weights, and the
    trained checkpoint → HF (always: every run can hand back a Hugging Face model)."""
    ck, out = plan.checkpoint, []
    if ck.init == "converted" and ck.hf_weights is not None:
        out.append(DpocConversion("hf_to_mcore.sh", "Hugging Face weights -> distributed checkpoint (any layout)",
                                  "hf-to-mcore", ck.hf_weights, ck.load, None))
    out.append(DpocConversion("mcore_to_hf.sh", "trained checkpoint (latest iteration) -> Hugging Face weights",
                              "mcore-to-hf", ck.save, f"{plan.run_dir}/hf", plan.data.tokenizer))
    return out


@dataclass(eq=False, repr=False)  # an intermediate: not frozen, compared by identity, no repr (one method to compile)
class Conversion:
    """One MindSpeed-LLM conversion script of the build."""
    file: str  # under mindspeed-rl/convert/
    title: str
    script: str  # convert_ckpt_v2.py | convert_ckpt.py
    args: tuple[str, ...]  # already shell-quoted
    load_dir: str
    save_dir: str


def mindspeed_conversions(plan: Plan) -> list[Conversion]:
    ck = plan.checkpoint
    if ck.mindspeed_load is None or ck.hf_weights is None:
        return []
    hf_out = f"{plan.run_dir}/hf"
    lora_merge = _lora_merge(plan)
    if plan.model.converter == "v2":
        script = "convert_ckpt_v2.py"
        to_mg = ["--load-model-type hf", "--save-model-type mg", *_v2_common(plan), *_layout(plan, target=True)]
        to_hf = ["--load-model-type mg", "--save-model-type hf", *_v2_common(plan), *_layout(plan, target=False),
                 *lora_merge]
    else:
        script = "convert_ckpt.py"
        to_mg = ["--use-mcore-models", "--model-type GPT", "--load-model-type hf", "--save-model-type mg",
                 *_legacy_common(plan), *_layout(plan, target=True), "--params-dtype bf16"]
        # the legacy converter writes HF weights only from a tp1/pp1 checkpoint
        to_hf = ["--use-mcore-models", "--model-type GPT", "--load-model-type mg", "--save-model-type hf",
                 *_legacy_common(plan), "--target-tensor-parallel-size 1", "--target-pipeline-parallel-size 1",
                 *lora_merge]
    return [
        Conversion("hf_to_mcore.sh", f"Hugging Face weights -> Megatron checkpoint for {_tag(plan)}", script,
                   tuple(to_mg), ck.hf_weights, ck.mindspeed_load),
        Conversion("mcore_to_hf.sh", "trained Megatron checkpoint -> Hugging Face weights"
                   + ("" if plan.model.converter == "v2" else " (reshard to tp1/pp1 first)"), script,
                   tuple(to_hf), ck.save, hf_out),
    ]


def _lora_merge(plan: Plan) -> list[str]:
    """mg -> hf of a LoRA run: the checkpoint holds base and adapters together, and MindSpeed-LLM's converter
    merges the adapters (W + alpha / r · B·A) when told their rank, alpha and targets."""
    lora = plan.lora
    if lora is None:
        return []
    return [f"--lora-r {lora.rank}", f"--lora-alpha {int(lora.alpha)}",
            "--lora-target-modules " + " ".join(lora.targets)]


def _tag(plan: Plan) -> str:
    lay = plan.layout
    return f"tp{lay.tp} pp{lay.pp} ep{lay.ep}" + (f" vpp{lay.vpp}" if lay.vpp > 1 else "")


def _v2_common(plan: Plan) -> list[str]:
    out = [f"--model-type-hf {shlex.quote(plan.model.hf_model_type)}"]
    lay = plan.layout
    if plan.model.moe is not None:
        if lay.moe_grouped_gemm:
            out.append("--moe-grouped-gemm")
        if lay.moe_tp_extend_ep:
            out.append("--moe-tp-extend-ep")
    return out


def _legacy_common(plan: Plan) -> list[str]:
    out = [f"--model-type-hf {shlex.quote(plan.model.hf_model_type)}",
           f"--tokenizer-model {shlex.quote(plan.data.tokenizer + '/tokenizer.json')}"]
    if plan.model.qkv_bias:
        out.append("--add-qkv-bias")
    return out


def _layout(plan: Plan, target: bool) -> list[str]:
    lay = plan.layout
    out = []
    if target:
        out += [f"--target-tensor-parallel-size {lay.tp}", f"--target-pipeline-parallel-size {lay.pp}"]
        if plan.model.moe is not None:
            out.append(f"--target-expert-parallel-size {lay.ep}")
            if lay.etp != lay.tp:
                out.append(f"--expert-tensor-parallel-size {lay.etp}")
    if lay.vpp > 1:
        out.append(f"--num-layers-per-virtual-pipeline-stage {lay.stage_layers[0] // lay.vpp}")
    if lay.num_layer_list is not None:
        out.append("--num-layer-list " + shlex.quote(",".join(map(str, lay.num_layer_list))))
    if lay.noop_layers:
        out.append("--noop-layers " + shlex.quote(",".join(map(str, lay.noop_layers))))
    return out
