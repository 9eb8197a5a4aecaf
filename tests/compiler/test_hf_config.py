"""config.json ⇄ architecture: the one mapping that fills a recipe from weights, and the one check that weights
fit megatron.args (runtime and node preflight), with its exact messages."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpoc.cli.explain import explain
from dpoc.compiler.pipeline import build, plan_recipe
from dpoc.contract import hf_config, megatron_args, resources
from dpoc.contract.architecture import Architecture
from dpoc.contract.errors import DpocError
from dpoc.contract.megatron_args import format_args, model_args
from dpoc.contract.specs import preset_model
from tests.compiler.test_preflight import touch_dataset
from tests.conftest import REPO


def arch_of(spec) -> dict:
    """The dict form config.json maps to: the architecture record's fields and the family (MoE routing is
    aux-loss balanced in every config, so config.json has no load-balancing key)."""
    arch = {f.name: getattr(spec, f.name) for f in dataclasses.fields(Architecture)} | {"family": spec.family}
    arch["moe"] = {k: v for k, v in dataclasses.asdict(spec.moe).items() if k != "load_balancing"} if spec.moe else None
    return arch


def args_of(spec, tmp_path: Path):
    path = tmp_path / "model.args"
    path.write_text(format_args(model_args(spec)))
    return megatron_args.parse([f"@{path}"], require_job=False)


@pytest.mark.parametrize("preset", resources.preset_names("models"))
def test_config_args_and_architecture_agree_for_every_preset(preset, tmp_path):
    spec = preset_model(preset)
    arch = arch_of(spec)
    config = hf_config.hf_config(arch, "bfloat16")
    found = hf_config.architecture(config, "config.json")
    assert {**found, "moe": found.get("moe")} == arch
    from_args = hf_config.architecture_from_args(args_of(spec, tmp_path))
    assert from_args == {k: v for k, v in arch.items() if k != "family"}
    assert Architecture.of(found) == Architecture.of(from_args) == Architecture.of(dataclasses.asdict(spec))
    (tmp_path / "w").mkdir()
    (tmp_path / "w/config.json").write_text(json.dumps(config))
    assert hf_config.mismatches(args_of(spec, tmp_path), tmp_path / "w", "m.args") == []


def test_transformers_spellings_are_read(tmp_path):
    """Older configs: top-level rope_theta, num_experts; transformers 5 writes rope_parameters, num_local_experts."""
    config = hf_config.hf_config(arch_of(preset_model("tiny-qwen3-moe")), "float32")
    theta = config.pop("rope_parameters")["rope_theta"]
    config.update(rope_theta=theta, num_local_experts=config.pop("num_experts"))
    arch = hf_config.architecture(config, "c")
    assert arch["rope_base"] == 1e6 and arch["moe"]["num_experts"] == 8


def write_config(tmp_path: Path, **changes) -> Path:
    config = hf_config.hf_config(arch_of(preset_model("tiny-qwen3")), "float32")
    config.update(changes)
    weights = tmp_path / "weights"
    weights.mkdir(exist_ok=True)
    (weights / "config.json").write_text(json.dumps(config))
    return weights


def test_every_mismatch_is_one_line_with_both_values(tmp_path):
    weights = write_config(tmp_path, num_hidden_layers=8, num_key_value_heads=4, tie_word_embeddings=True,
                           model_type="qwen2", rms_norm_eps=1e-5, rope_parameters={"rope_theta": 10000.0})
    problems = hf_config.mismatches(args_of(preset_model("tiny-qwen3"), tmp_path), weights, "b/megatron.args")
    shown = f"{weights}/config.json"
    assert [str(p) for p in problems] == [
        f"{shown}: num_hidden_layers: 8 does not match --num-layers 4 in b/megatron.args",
        f"{shown}: num_key_value_heads: 4 does not match --num-query-groups 2 in b/megatron.args",
        f"{shown}: rope_theta: 10000 does not match --rotary-base 1e+06 in b/megatron.args",
        f"{shown}: rms_norm_eps: 1e-05 does not match --norm-epsilon 1e-06 in b/megatron.args",
        f'{shown}: model_type: "qwen2" (without qk_layernorm) does not match --qk-layernorm in b/megatron.args',
        f'{shown}: model_type: "qwen2" (with qkv_bias) does not match no --add-qkv-bias in b/megatron.args',
        f"{shown}: tie_word_embeddings: true does not match --untie-embeddings-and-output-weights in b/megatron.args",
    ]


def test_moe_weights_for_a_dense_job_are_named(tmp_path):
    moe = hf_config.hf_config(arch_of(preset_model("tiny-qwen3-moe")), "float32")
    weights = write_config(tmp_path, **moe)
    problems = hf_config.mismatches(args_of(preset_model("tiny-qwen3"), tmp_path), weights, "m.args")
    assert [str(p) for p in problems] == [
        f"{weights}/config.json: num_experts: 8 does not match no --num-experts in m.args"]


@pytest.mark.parametrize(("change", "line"), [
    ({"hidden_act": "gelu"}, 'hidden_act: "gelu": the runtime builds SwiGLU MLPs (valid: silu)'),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}},
     'rope_parameters: {"rope_type": "llama3", "rope_theta": 500000.0}: rope scaling is not supported '
     "(valid: rope_type default)"),
    ({"use_sliding_window": True}, "use_sliding_window: true: sliding-window attention is not supported (valid: false)"),
    ({"attention_bias": True}, "attention_bias: true: biases on q/k/v/o projections are not supported for this "
     "family (valid: false)"),
    ({"model_type": "mistral"}, "model_type: 'mistral' is not a supported architecture (valid: llama, qwen2, qwen3, "
     "qwen3_moe)"),
])
def test_what_the_runtime_cannot_build_is_refused(change, line, tmp_path):
    weights = write_config(tmp_path, **change)
    with pytest.raises(DpocError) as err:
        hf_config.mismatches(args_of(preset_model("tiny-qwen3"), tmp_path), weights, "m.args")
    assert str(err.value) == f"{weights}/config.json: {line}"


RECIPE = """\
model:
  hf_weights: ./weights
hardware: {preset: cpu, devices_per_node: 2}
dataset: {path: ./data.jsonl}
training: {seq_length: 64, global_batch_size: 8, train_iters: 2, lr: 1.0e-4}
parallelism: {tp: 1, pp: 1, micro_batch_size: 1}
"""


def test_a_recipe_naming_only_weights_reads_their_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path)
    (tmp_path / "r.yaml").write_text(RECIPE)
    plan = plan_recipe("r.yaml")
    assert plan.model == preset_model("tiny-qwen3").__class__(**{
        **preset_model("tiny-qwen3").__dict__, "name": "weights", "mindspeed_name": "weights"})
    assert plan.source_of("model.num_layers").source == "hf:config.json"
    shown = explain(plan).splitlines()
    row = next(r for r in shown if r.startswith("model.num_layers "))
    assert row.split()[:2] == ["model.num_layers", "4"]
    assert row.endswith("hf:config.json  (from ./weights/config.json)")
    init = next(r for r in shown if r.startswith("checkpoint.init "))
    assert '"hf"' in init and "derived:model.hf_weights" in init
    # the recipe's own keys override the config's, as over a preset
    assert plan_recipe("r.yaml", ["model.num_layers=2"]).model.num_layers == 2


def test_init_hf_args_name_the_weights_for_policy_and_reference(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path)
    (tmp_path / "r.yaml").write_text(RECIPE)
    build("r.yaml", ["checkpoint.ref_model=./sft"], out=tmp_path / "b")
    args = megatron_args.parse([f"@{tmp_path / 'b/megatron.args'}"])
    assert (args.dpoc_init, args.dpoc_hf_weights, args.ref_model, args.load) == ("hf", "./weights", "./sft", None)
    resume = megatron_args.parse([f"@{tmp_path / 'b/resume/megatron.args'}"])
    assert (resume.dpoc_init, resume.ref_model, resume.load, resume.finetune) == ("hf", "./sft", "runs/b/checkpoints",
                                                                                  False)
    assert [p.name for p in (tmp_path / "b/convert").iterdir()] == ["mcore_to_hf.sh"]


def test_unreadable_config_names_the_field_and_the_way_out(tmp_path, monkeypatch, dpoc_cli):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(RECIPE)
    result = dpoc_cli("build", "r.yaml")
    assert result.code == 2
    assert result.err == ("r.yaml: model.hf_weights: ./weights is not a directory (expected Hugging Face weights: "
                          "config.json and *.safetensors) (a relative path: read from the job's working directory, "
                          f"taken to be this one, {tmp_path}); give model.preset (or the architecture inline), or "
                          "run dpoc build where the path holds the weights' config.json\n")


def test_relative_paths_are_read_from_the_working_directory_and_every_problem_is_reported(tmp_path, monkeypatch,
                                                                                          dpoc_cli):
    """Run from elsewhere than the job's working directory: the error names the directory it read from, and the
    recipe's other problems are reported with it, not hidden behind it."""
    write_config(tmp_path)
    (tmp_path / "r.yaml").write_text(RECIPE.replace("lr: 1.0e-4", "lr: fast").replace(
        "hardware: {", "hardware: {hostfile: ./hosts, "))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = dpoc_cli("validate", tmp_path / "r.yaml")
    assert result.code == 2
    relative = f"(a relative path: read from the job's working directory, taken to be this one, {elsewhere})"
    assert result.err.splitlines() == [
        f"{tmp_path}/r.yaml: model.hf_weights: ./weights is not a directory (expected Hugging Face weights: "
        f"config.json and *.safetensors) {relative}; give model.preset (or the architecture inline), or run dpoc "
        "build where the path holds the weights' config.json",
        f"{tmp_path}/r.yaml: hardware.hostfile: cannot read hosts: No such file or directory {relative}",
        f"{tmp_path}/r.yaml: training.lr: must be a number (got 'fast')"]
    monkeypatch.chdir(tmp_path)  # the job's working directory: the same recipe reads its weights
    (tmp_path / "hosts").write_text("127.0.0.1 slots=2\n")
    assert dpoc_cli("validate", "r.yaml").err.splitlines() == ["r.yaml: training.lr: must be a number (got 'fast')"]


@pytest.mark.parametrize(("overrides", "line"), [
    (["checkpoint.init=hf", "checkpoint.load=./x"],
     "checkpoint.load: checkpoint.init is hf: the policy starts from model.hf_weights (valid: leave it out, or "
     "checkpoint.init converted)"),
    (["checkpoint.init=random", "checkpoint.ref_model=./x"],
     "checkpoint.ref_model: checkpoint.init is random: policy and reference start from the same seeded init (valid: "
     "leave it out, or checkpoint.init hf/converted)"),
    (["runtime=mindspeed-rl", "checkpoint.load=./x"],
     "checkpoint.load: names the dpoc runtime's weights; runtime mindspeed-rl loads MindSpeed-LLM's per-rank ones "
     "from checkpoint.mindspeed_load (valid: rename it checkpoint.mindspeed_load, or runtime=dpoc)"),
    (["checkpoint.load=./w", "checkpoint.mindspeed_load=./w"],
     "checkpoint.mindspeed_load: ./w: is both checkpoint.load (dpoc's distributed checkpoint) and "
     "checkpoint.mindspeed_load (MindSpeed-LLM's per-rank checkpoint): each target's converter would overwrite the "
     "other's (valid: two folders, e.g. ./model_weights/r-mcore and ./model_weights/r-tp1-pp1-ep1)"),
    (["checkpoint.init=converted", "checkpoint.load=./model_weights/r-tp1-pp1-ep1"],
     "checkpoint.load: ./model_weights/r-tp1-pp1-ep1: is both checkpoint.load (dpoc's distributed checkpoint) and "
     "checkpoint.mindspeed_load (MindSpeed-LLM's per-rank checkpoint): each target's converter would overwrite the "
     "other's (valid: two folders, e.g. ./model_weights/r-mcore and ./model_weights/r-tp1-pp1-ep1)"),
])
def test_checkpoint_combinations_that_mean_nothing_are_refused(overrides, line, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path)
    (tmp_path / "r.yaml").write_text(RECIPE)
    with pytest.raises(DpocError) as err:
        plan_recipe("r.yaml", overrides)
    assert f"r.yaml: {line}" in str(err.value).splitlines()


def test_init_hf_without_weights_is_refused():
    with pytest.raises(DpocError) as err:
        plan_recipe(REPO / "recipes/tiny_cpu.yaml", ["checkpoint.init=hf"])
    assert str(err.value).endswith("model.hf_weights: is required for checkpoint.init hf (valid: a Hugging Face "
                                   "weights directory, or checkpoint.init converted with checkpoint.load)")


def test_preflight_checks_the_weights_config_against_the_build(tmp_path, monkeypatch, dpoc_cli):
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path)
    (tmp_path / "r.yaml").write_text(RECIPE.replace("hardware:", "  tokenizer: ./weights\nhardware:"))
    build("r.yaml", out=tmp_path / "b")
    touch_dataset("runs/b/dataset/data", made_by=tmp_path / "b")
    assert dpoc_cli("preflight", tmp_path / "b").code == 0
    write_config(tmp_path, num_hidden_layers=6)  # the weights on this node are another model
    result = dpoc_cli("preflight", tmp_path / "b")
    assert result.code == 2 and result.err == (
        f"./weights/config.json: num_hidden_layers: 6 does not match --num-layers 4 in {tmp_path}/b/megatron.args\n")


def test_reading_a_config_does_not_import_torch(tmp_path):
    write_config(tmp_path)
    (tmp_path / "r.yaml").write_text(RECIPE)
    code = ("import sys; from dpoc.cli import main; rc = main(['build', 'r.yaml', '-o', 'o']);"
            "print(rc, [m for m in ('torch', 'megatron', 'transformers', 'numpy') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stderr
