"""Weight-conversion commands (MindSpeed-LLM) for exactly the Plan's layout.

MindSpeed-LLM checkpoints are per rank, so the converter must be told the training layout: tp, pp, ep,
vpp, the layer list or no-op layers, grouped GEMM and — the classic trap — `--moe-tp-extend-ep` exactly when
training sets it (else the experts are laid out differently and the model produces garbage).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from dpoc.plan import Plan


@dataclass(frozen=True)
class Conversion:
    file: str  # under convert/
    title: str
    script: str  # convert_ckpt_v2.py | convert_ckpt.py
    args: tuple[str, ...]  # already shell-quoted
    load_dir: str
    save_dir: str


def conversions(plan: Plan) -> list[Conversion]:
    ck = plan.checkpoint
    if ck.init == "random" or ck.hf_weights is None:
        return []
    hf_out = f"{plan.run_dir}/hf"
    if plan.model.converter == "v2":
        script = "convert_ckpt_v2.py"
        to_mg = ["--load-model-type hf", "--save-model-type mg", *_v2_common(plan), *_layout(plan, target=True)]
        to_hf = ["--load-model-type mg", "--save-model-type hf", *_v2_common(plan), *_layout(plan, target=False)]
    else:
        script = "convert_ckpt.py"
        to_mg = ["--use-mcore-models", "--model-type GPT", "--load-model-type hf", "--save-model-type mg",
                 *_legacy_common(plan), *_layout(plan, target=True), "--params-dtype bf16"]
        # the legacy converter writes HF weights only from a tp1/pp1 checkpoint
        to_hf = ["--use-mcore-models", "--model-type GPT", "--load-model-type mg", "--save-model-type hf",
                 *_legacy_common(plan), "--target-tensor-parallel-size 1", "--target-pipeline-parallel-size 1"]
    return [
        Conversion("hf_to_mcore.sh", f"Hugging Face weights -> Megatron checkpoint for {_tag(plan)}", script,
                   tuple(to_mg), ck.hf_weights, ck.load),
        Conversion("mcore_to_hf.sh", "trained Megatron checkpoint -> Hugging Face weights"
                   + ("" if plan.model.converter == "v2" else " (reshard to tp1/pp1 first)"), script,
                   tuple(to_hf), ck.save, hf_out),
    ]


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
