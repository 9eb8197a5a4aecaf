"""Malformed recipes: exit 2, one line per problem naming the exact field, no traceback, nothing written."""

from __future__ import annotations

import pytest

from tests.conftest import RECIPES, run_subprocess

GOOD = RECIPES / "qwen3_30b.yaml"

# (overrides on the shipped recipe, the exact field the message names, text the message contains)
OVERRIDE_CASES = [
    # schema: types, ranges, enums, unknown keys
    (["training.global_batch_size=64k"], "training.global_batch_size", "must be an integer (got '64k')"),
    (["training.global_batch_size=0"], "training.global_batch_size", "must be >= 1 (got 0)"),
    (["training.lr=-1"], "training.lr", "must be > 0 (got -1)"),
    (["training.lr_decay_style=exponential"], "training.lr_decay_style",
     "must be one of 'constant', 'linear', 'cosine' (got 'exponential')"),
    (["training.precision=bf32"], "training.precision", "must be one of 'bf16', 'fp16', 'fp32'"),
    (["training.adam_beta2=1.0"], "training.adam_beta2", "must be < 1 (got 1.0)"),
    (["training.lrr=1e-7"], "training.lrr", "unknown key (did you mean 'lr'?"),
    (["training.sed=1"], "training.sed", "unknown key (did you mean 'seed'?"),
    (["parallelism.tpp=2"], "parallelism.tpp", "unknown key (did you mean 'tp'?"),
    (["parallelism.tp=0"], "parallelism.tp", "must be >= 1 (got 0)"),
    (["parallelism.recompute=partial"], "parallelism.recompute", "must be one of 'none', 'selective', 'full'"),
    (["dpo.loss=dpop"], "dpo.loss", "must be one of 'sigmoid', 'hinge', 'ipo', 'exo_pair'"),
    (["dpo.loss=[sigmoid,dpop]"], "dpo.loss.1", "must be one of 'sigmoid', 'hinge', 'ipo', 'exo_pair'"),
    (["dpo.beta=0"], "dpo.beta", "must be > 0 (got 0)"),
    (["dpo.label_smoothing=0.7"], "dpo.label_smoothing", "must be <= 0.5 (got 0.7)"),
    (["dataset.template=vicuna"], "dataset.template", "must be one of 'tokenizer', 'qwen3'"),
    (["dataset.map_keys.answer=x"], "dataset.map_keys.answer",
     "unknown key (valid: chosen, completion, history, label, prompt, query, rejected, system)"),
    (["dataset.workers=0"], "dataset.workers", "must be >= 1 (got 0)"),
    (["model.num_layers=0"], "model.num_layers", "must be >= 1 (got 0)"),
    (["model.hidden=4096"], "model.hidden", "unknown key (did you mean"),
    (["model.family=gpt"], "model.family", "must be one of 'qwen3', 'qwen3_moe', 'qwen2', 'llama'"),
    (["hardware.nodes=0"], "hardware.nodes", "must be >= 1 (got 0)"),
    (["hardware.master_port=70000"], "hardware.master_port", "must be <= 65535 (got 70000)"),
    (["runtime=slurm"], "runtime", "must be one of 'dpoc', 'mindspeed-rl' (got 'slurm')"),
    (["checkpoint.resume=true"], "checkpoint.resume", "unknown key (valid: init, keep, load, mindspeed_load, "
     "mindspeed_ref_model, ref_model, save)"),
    (["model.preset=qwen3-30b"], "model.preset", "unknown preset 'qwen3-30b' (did you mean 'qwen3-30b-a3b'?"),
    (["hardware.preset=atlas-a5"], "hardware.preset", "unknown preset 'atlas-a5' (did you mean"),
    # semantic rules, through the whole pipeline
    (["parallelism.tp=3"], "parallelism.tp", "tp=3: 32 attention heads and 4 KV heads need tp in {1, 2, 4}"),
    (["parallelism.pp=5"], "parallelism.pp", "pp=5 does not divide 48 layers"),
    (["parallelism.ep=3"], "parallelism.ep", "ep=3 does not divide 128 experts"),
    (["training.global_batch_size=63"], "training.global_batch_size", "63 pairs is not a multiple of"),
    (["training.seq_length=65536"], "training.seq_length", "exceeds the model's max_position_embeddings 40960"),
    (["parallelism.sequence_parallel=false"], "parallelism.sequence_parallel", "a MoE model with tp=2 needs"),
    (["parallelism.vpp=4"], "parallelism.vpp", "vpp=4 does not divide the 6 layers per pipeline stage"),
    (["parallelism.moe_dispatcher=alltoall_seq"], "parallelism.moe_dispatcher", "has no alltoall_seq dispatcher"),
    (["runtime=mindspeed-rl", "dpo.beta=0.2"], "dpo.beta", "MindSpeed-RL's DPO config (MegatronConfig) has no dpo_beta "
     "field"),
    (["hardware.hosts=[10.0.0.1]"], "hardware.hosts", "lists 1 hosts but hardware.nodes is 2"),
    (["parallelism.num_layer_list=[12,12,12,12]"], "parallelism.num_layer_list", "has 4 entries but pp=8"),
    (["training.warmup_iters=2000"], "training.warmup_iters", "2000 is not below train_iters 1000; valid: fewer "
     "warm-up steps than training steps"),
    # the loss family (dpoc.compiler.resolve.dpo_loss)
    (["dpo.loss=hinge", "dpo.label_smoothing=0.1"], "dpo.label_smoothing",
     "no chosen loss reads it (loss: hinge); valid: leave it out, or a loss in ['sigmoid', 'exo_pair', 'robust', "
     "'aot', 'aot_unpaired', 'simpo', 'cpo']"),
    (["dpo.loss=[sigmoid,bco_pair,sft]", "dpo.loss_weights=[0.8,0.2]"], "dpo.loss_weights",
     "2 weights for 3 losses (sigmoid, bco_pair, sft); valid: one weight per dpo.loss entry"),
    (["dpo.loss=exo_pair"], "dpo.label_smoothing", "exo_pair needs EXO's epsilon above 0"),
    (["dpo.loss=robust", "dpo.label_smoothing=0.5"], "dpo.label_smoothing",
     "0.5: robust's flip probability must be below 0.5 (valid: 0 <= label_smoothing < 0.5)"),
    (["dpo.loss=[sigmoid,simpo]"], "dpo.loss", "simpo is reference-free and cannot be added to other losses"),
    (["dpo.loss=simpo", "dpo.reference=live"], "dpo.reference",
     "simpo is reference-free: no reference is built, loaded or run (valid: leave dpo.reference out, or a loss "
     "with a reference such as sigmoid)"),
    (["dpo.loss=orpo", "checkpoint.ref_model=./ref"], "checkpoint.ref_model", "orpo is reference-free"),
    (["dpo.loss=cpo", "dpo.sft_weight=0.5"], "dpo.sft_weight",
     "0.5: loss cpo already has an NLL term (valid: 0; use dpo.cpo_alpha)"),
    (["dpo.loss=[sigmoid,sft]", "dpo.sft_weight=0.5"], "dpo.sft_weight", "use the weight of sft in dpo.loss_weights"),
    (["dpo.loss=bco_pair", "dpo.f_divergence_type=js_divergence"], "dpo.f_divergence_type",
     "js_divergence: has no f-divergence form for ['bco_pair']"),
    (["dpo.f_alpha_divergence_coef=0.3"], "dpo.f_alpha_divergence_coef", "applies to f_divergence_type "
     "alpha_divergence only"),
    (["dpo.simpo_gamma=1"], "dpo.simpo_gamma", "no chosen loss reads it (loss: sigmoid); valid: leave it out, or "
     "a loss in ['simpo']"),
    (["dpo.discopop_tau=0.1", "dpo.loss=ipo"], "dpo.discopop_tau", "a loss in ['discopop']"),
    (["dpo.ld_alpha=0.5", "dpo.reference=precomputed"], "dpo.ld_alpha",
     "the precomputed reference file holds whole-sequence sums"),
    (["dpo.ld_alpha=0.5", "dpo.loss=simpo"], "dpo.ld_alpha", "simpo is reference-free"),
    (["runtime=mindspeed-rl", "dpo.loss=simpo"], "dpo.loss",
     "simpo: MindSpeed-LLM's DPO has one loss of sigmoid, hinge, ipo; valid: one of those, or runtime=dpoc"),
    (["runtime=mindspeed-rl", "dpo.ld_alpha=0.5"], "dpo.ld_alpha", "MindSpeed-LLM's DPO has no such option"),
    (["parallelism.etp=4", "parallelism.ep=4", "parallelism.pp=4"], "parallelism.etp",
     "etp=4: experts are split either like attention or not at all"),
    (["parallelism.ep=3", "model.moe.num_experts=96"], "parallelism.ep",
     "expert grid etp·ep·pp = 2·3·8 = 48 does not divide the world size 32; valid: ep in {1, 2} at etp=2, pp=8"),
    (["parallelism.tp=32", "parallelism.pp=1"], "parallelism.tp", "tp=32 would put a tensor-parallel group across nodes"),
    (["runtime=mindspeed-rl", "parallelism.noop_layers=[60]"], "parallelism.noop_layers",
     "indices [60] are outside the 49 layers (48 real + 1 no-op); valid: 0..48"),
    (["runtime=mindspeed-rl", "parallelism.cp=2", "parallelism.pp=4", "training.seq_length=4094"], "parallelism.cp",
     "cp=2: seq_length 4094 must be divisible by 2·cp = 4"),
    (["parallelism.tp=1", "parallelism.sequence_parallel=true"], "parallelism.sequence_parallel",
     "sequence parallelism needs tp > 1 (tp=1); valid: false"),
    (["training.dynamic_padding=false", "training.seq_length=4095"], "training.seq_length",
     "4095 must be divisible by tp·cp = 2 when sequences are padded to seq_length"),
    (["model.preset=qwen3-8b", "parallelism.ep=2"], "parallelism.ep", "qwen3-8b is a dense model (no experts)"),
    (["runtime=mindspeed-rl", "parallelism.moe_tp_extend_ep=true", "parallelism.moe_dispatcher=allgather"],
     "parallelism.moe_tp_extend_ep", "is incompatible with the allgather dispatcher"),
    (["runtime=mindspeed-rl", "parallelism.moe_alltoall_overlap_comm=true"], "parallelism.moe_alltoall_overlap_comm",
     "needs moe_permutation_async_comm=true, moe_dispatcher=alltoall_seq, moe_tp_extend_ep=true"),
    (["parallelism.moe_mc2=true"], "parallelism.moe_mc2",
     "unknown key: removed, because no target can express it: MindSpeed's MC2 fuses tensor-parallel linear layers "
     "with their communication and does not apply to MoE models with grouped GEMM, and MindSpeed-RL's DPO config "
     "has no field for it; remove the key"),
    (["parallelism.recompute=selective", "parallelism.recompute_num_layers=2"], "parallelism.recompute_method",
     "apply to full recompute only (recompute=selective)"),
    (["parallelism.recompute=full", "parallelism.recompute_num_layers=9"], "parallelism.recompute_num_layers",
     "9 exceeds the 6 layers of the smallest pipeline chunk; valid: 1..6"),
    (["training.min_lr=1e-3"], "training.min_lr", "0.001 exceeds lr 5e-08; valid: min_lr <= lr"),
    (["runtime=mindspeed-rl", "parallelism.recompute=selective"], "parallelism.recompute",
     "selective: MindSpeed-RL's DPO config (MegatronConfig) cannot set it"),
    (["runtime=mindspeed-rl", "training.packing=true"], "training.packing",
     "true: MindSpeed-RL's pairwise DPO data has no packing (each micro-batch holds whole padded pairs); valid: "
     "false, or runtime=dpoc"),
    (["runtime=mindspeed-rl", "dpo.reference=precomputed"], "dpo.reference",
     "precomputed: MindSpeed-LLM's DPO runs the frozen reference forward in every step and reads no precomputed "
     "log-probs; valid: live, or runtime=dpoc"),
    (["checkpoint.init=random", "runtime=mindspeed-rl"], "checkpoint.init", "random: MindSpeed-RL always loads converted per-rank weights"),
    (["parallelism.moe_grouped_gemm=true", "hardware.preset=cpu", "hardware.devices_per_node=16"],
     "parallelism.moe_grouped_gemm", "grouped GEMM kernels exist only on npu and cuda devices"),
]


@pytest.mark.parametrize("overrides, field, text", OVERRIDE_CASES, ids=[" ".join(c[0]) for c in OVERRIDE_CASES])
def test_bad_override_names_the_field(dpoc_cli, tmp_path, overrides, field, text):
    out = tmp_path / "build"
    result = dpoc_cli("build", GOOD, *overrides, "-o", out)
    assert result.code == 2, result.out
    lines = result.err.strip().splitlines()
    matching = [ln for ln in lines if ln.startswith(f"{GOOD}: {field}: ")]
    assert matching, f"no line names {field}: {lines}"
    assert any(text in ln for ln in matching), lines
    assert not out.exists() and list(tmp_path.iterdir()) == []


RECIPE_TEXT_CASES = [
    ("model: {preset: qwen3-8b}\nhardware: @cpu\n", "line 2", "not valid YAML"),
    ("- a list\n- not a mapping\n", "(top level)", "a recipe is a mapping of sections"),
    ("model: {preset: tiny-qwen3, hf_weights: ./w}\nhardware: {preset: cpu}\ndataset: {path: d.jsonl}\n",
     "training", "is required"),
    ("model: {preset: tiny-qwen3}\nhardware: {preset: cpu}\ndataset: {path: d.jsonl}\n"
     "training: {seq_length: 8, global_batch_size: 8, train_iters: 1, lr: 0.1}\n",
     "model.hf_weights", "is required to convert the initial weights"),
    ("model: {preset: tiny-qwen3, hf_weights: ./w}\nhardware: {preset: cpu}\ndataset: {path: d.jsonl}\n"
     "training: {seq_length: '${training.missing}', global_batch_size: 8, train_iters: 1, lr: 0.1}\n",
     "training.seq_length", "cannot resolve interpolation"),
    ("model: {preset: tiny-qwen3, hf_weights: ./w}\nhardware: {preset: cpu}\ndataset: {path: d.jsonl}\n"
     "training: {seq_length: 8, global_batch_size: 8, train_iters: 1, lr: 0.1}\nextra: 1\n",
     "extra", "unknown key (valid: checkpoint, dataset, dpo, hardware, launch, lora, model, name, parallelism, run_dir, runtime, "
     "training)"),
]


@pytest.mark.parametrize("text, field, message", RECIPE_TEXT_CASES, ids=[c[1] for c in RECIPE_TEXT_CASES])
def test_bad_recipe_file_names_the_field(dpoc_cli, tmp_path, text, field, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    result = dpoc_cli("build", recipe, "-o", tmp_path / "out")
    assert result.code == 2
    assert any(ln.startswith(f"{recipe}: {field}: ") and message in ln for ln in result.err.splitlines()), result.err
    assert not (tmp_path / "out").exists()


def test_several_problems_are_reported_one_per_line(dpoc_cli, tmp_path):
    result = dpoc_cli("validate", GOOD, "--set", "training.lr=-1", "--set", "dpo.beta=0")
    assert result.code == 2
    assert sorted(result.err.splitlines()) == [
        f"{GOOD}: dpo.beta: must be > 0 (got 0)",
        f"{GOOD}: training.lr: must be > 0 (got -1)",
    ]


def test_hostfile_errors_name_the_line(dpoc_cli, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\n10.0.0.1 slots=16\n10.0.0.2 slots=8\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(GOOD.read_text().replace("hosts: [192.168.1.10, 192.168.1.11]", f"hostfile: {hostfile}"))
    result = dpoc_cli("build", recipe, "-o", tmp_path / "o")
    assert result.code == 2
    assert result.err.strip() == f"{hostfile}: line 3: slots=8 does not match 16 devices per node of the hardware preset"


def test_real_process_exits_2_without_traceback(tmp_path):
    proc = run_subprocess("build", GOOD, "parallelism.tp=3", "-o", tmp_path / "o")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"{GOOD}: parallelism.tp: tp·pp·cp = 3·8·1 = 24 does not divide the world size 32 (2 nodes × 16 devices); "
        "valid: tp in {1, 2, 4} at pp=8, cp=1",
        f"{GOOD}: parallelism.tp: tp=3: 32 attention heads and 4 KV heads need tp in {{1, 2, 4}}",
        f"{GOOD}: parallelism.tp: tp=3: the 151936 vocabulary rows do not split evenly; valid: tp in "
        "{1, 2, 4, 8, 16}, or weights whose vocab_size is a multiple of tp",
        f"{GOOD}: parallelism.tp: tp=3 would put a tensor-parallel group across nodes over the slow inter-node link "
        "(16 devices per node); valid: tp in {1, 2, 4, 8, 16}",
    ]  # not the follow-on "parallelism.etp: etp=2: ... valid: etp in {1, 3}"


@pytest.mark.parametrize(("override", "field", "hint"), [
    ("learning_rate=1e-6", "learning_rate", "did you mean 'training.lr'? (learning_rate is TRL's / transformers' name)"),
    ("training.learning_rate=1e-6", "training.learning_rate", "did you mean 'training.lr'?"),
    ("per_device_train_batch_size=2", "per_device_train_batch_size", "did you mean 'parallelism.micro_batch_size'?"),
    ("training.gradient_accumulation_steps=4", "training.gradient_accumulation_steps",
     "did you mean 'training.global_batch_size', the pairs per optimizer step: micro_batch_size x data-parallel size "
     "x accumulation steps?"),
    ("num_train_epochs=1", "num_train_epochs", "did you mean 'training.train_iters', in optimizer steps"),
    ("dpo.max_length=1024", "dpo.max_length", "did you mean 'training.seq_length'?"),
    ("training.beta=0.1", "training.beta", "did you mean 'dpo.beta'?"),
    ("training.warmup_ratio=0.1", "training.warmup_ratio", "did you mean 'training.warmup_iters', in steps"),
])
def test_trl_and_hugging_face_names_point_to_the_recipe_field(override, field, hint, dpoc_cli, tmp_path):
    result = dpoc_cli("build", GOOD, override, "-o", tmp_path / "b")
    assert result.code == 2
    assert result.err.startswith(f"{GOOD}: {field}: unknown key ({hint}"), result.err


def test_every_foreign_name_points_to_a_recipe_field():
    from dpoc.contract.errors import FOREIGN_NAMES
    from dpoc.contract.schemas import schema

    recipe = schema("recipe")
    sections = {**recipe["properties"], "parallelism": recipe["$defs"]["layout"]}
    for name, (target, _) in FOREIGN_NAMES.items():
        section, _, key = target.partition(".")
        assert (key in sections[section]["properties"]) if key else section in recipe["properties"], name
