"""The build directory: its contract, its determinism and atomicity, and scripts that run as written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpoc.compiler.pipeline import build, plan_recipe
from dpoc.contract import megatron_args, schemas
from tests.conftest import RECIPES, REPO, run_subprocess
from tests.launch.helpers import route_torchrun

CONTRACT = ["plan.json", "megatron.args", "resume/megatron.args", "nodes/node-0.sh", "nodes/node-1.sh", "launch.sh",
            "ray-head.sh", "ray-worker.sh",
            "preprocess.yaml", "preprocess.sh", "convert/mcore_to_hf.sh",
            "mindspeed-rl/dpo_qwen3_30b.yaml", "mindspeed-rl/dpo_qwen3_30b_resume.yaml",
            "mindspeed-rl/model/qwen3_30b_a3b.yaml", "mindspeed-rl/datasets/qwen3_30b.yaml",
            "mindspeed-rl/nodes/node-0.sh", "mindspeed-rl/nodes/node-1.sh", "mindspeed-rl/convert/hf_to_mcore.sh",
            "mindspeed-rl/convert/mcore_to_hf.sh", "manifest.json"]
MINDSPEED_FIELDS = {ln for ln in (REPO / "tests/fixtures/mindspeed_megatron_config_fields.txt").read_text().split("\n")
                    if ln and not ln.startswith("#")}


@pytest.fixture(scope="module")
def guide_build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b") / "qwen3_30b"
    build(RECIPES / "qwen3_30b.yaml", out=out)
    return out


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_guide_build_has_the_whole_contract(guide_build):
    assert sorted(files_of(guide_build)) == sorted(CONTRACT)
    plan = json.loads((guide_build / "plan.json").read_text())
    assert (plan["layout"]["tp"], plan["layout"]["pp"], plan["layout"]["dp"], plan["layout"]["ep"]) == (2, 8, 2, 1)
    assert schemas.check("plan", plan, "plan.json") == []


def test_manifest_lists_every_file_with_its_hash(guide_build):
    import hashlib

    manifest = json.loads((guide_build / "manifest.json").read_text())
    files = files_of(guide_build)
    del files["manifest.json"]
    assert manifest["files"] == {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
    assert manifest["plan_hash"] == hashlib.sha256(files["plan.json"]).hexdigest()
    assert manifest["skipped_targets"] == {}


def test_megatron_args_parse_with_the_runtime_parser(guide_build):
    args = megatron_args.parse([f"@{guide_build / 'megatron.args'}"])
    plan = plan_recipe(RECIPES / "qwen3_30b.yaml")
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size,
            args.expert_tensor_parallel_size) == (2, 8, 1, 2)
    assert args.lr == 5e-8 and args.global_batch_size == 64 and args.seq_length == 4096 and args.seed == 42
    assert args.num_experts == 128 and args.moe_router_topk == 8 and args.norm_epsilon == 1e-6
    # the dpoc runtime reads the HF weights itself: the guide's per-rank folder is MindSpeed-RL's alone
    assert args.dpoc_init == "hf" and args.dpoc_hf_weights == args.ref_model == "./model_from_hf/Qwen3-30B-A3B"
    assert args.load is None and not args.finetune
    assert args.dpoc_plan_hash == plan.hash()


def test_resume_flips_exactly_what_must_flip(guide_build):
    fresh = (guide_build / "megatron.args").read_text().splitlines()
    resume = (guide_build / "resume/megatron.args").read_text().splitlines()
    assert sorted(set(fresh) - set(resume)) == []
    assert sorted(set(resume) - set(fresh)) == ["--load ./ckpt"]
    assert "--ref-model ./model_from_hf/Qwen3-30B-A3B" in resume  # the reference stays the initial weights


def test_resume_of_converted_weights_drops_the_finetune_start(tmp_path):
    out = tmp_path / "c"
    build(RECIPES / "qwen3_30b.yaml", ["checkpoint.init=converted"], out=out)
    fresh = (out / "megatron.args").read_text().splitlines()
    resume = (out / "resume/megatron.args").read_text().splitlines()
    assert sorted(set(fresh) - set(resume)) == ["--finetune", "--load ./model_weights/qwen3_30b-mcore",
                                                 "--no-load-optim", "--no-load-rng"]
    assert sorted(set(resume) - set(fresh)) == ["--load ./ckpt"]
    assert "--ref-model ./model_weights/qwen3_30b-mcore" in resume


def converted_by(script: Path, scratch: Path) -> str:
    """The folder a rendered hf_to_mcore.sh writes, from the argv it hands a stub `python` when it runs in the
    job's working directory `scratch`."""
    scratch.mkdir()
    env, log = stub_tools(scratch, one_arg_per_line=True)
    done = subprocess.run(["bash", str(script)], cwd=scratch, env={**env, "MINDSPEED_LLM_HOME": "/ms"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    argv = log.read_text().splitlines()
    return argv[argv.index("--save-dir") + 1] if "--save-dir" in argv else argv[-1]


@pytest.mark.parametrize("overrides", [[], ["checkpoint.init=converted"], ["runtime=mindspeed-rl"],
                                       ["runtime=mindspeed-rl", "checkpoint.init=converted"]],
                         ids=["guide", "dpoc converted", "mindspeed-rl", "mindspeed-rl, dpoc converted"])
def test_each_target_converts_into_and_loads_from_its_own_folder(tmp_path, overrides):
    """One path, two formats, was a trap: a user running both converters overwrote one with the other. Each
    target's converter writes exactly the folder its own config loads, and the two never meet."""
    out = tmp_path / "qwen3_30b"
    build(RECIPES / "qwen3_30b.yaml", overrides, out=out)
    args = megatron_args.parse([f"@{out / 'megatron.args'}"])
    train = yaml.safe_load((out / "mindspeed-rl/dpo_qwen3_30b.yaml").read_text())["megatron_training"]
    mindspeed = converted_by(out / "mindspeed-rl/convert/hf_to_mcore.sh", tmp_path / "ms")
    assert train["load"] == train["ref_model"] == mindspeed == "./model_weights/Qwen3-30B-TP2-PP8-EP1"
    if "checkpoint.init=converted" in overrides:
        dpoc = converted_by(out / "convert/hf_to_mcore.sh", tmp_path / "dpoc")
        assert args.load == args.ref_model == dpoc == "./model_weights/qwen3_30b-mcore"
    else:
        assert not (out / "convert/hf_to_mcore.sh").exists()
        assert args.load is None and args.dpoc_hf_weights == args.ref_model == "./model_from_hf/Qwen3-30B-A3B"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["provenance"]["checkpoint.mindspeed_load"]["source"].startswith("user")
    assert plan["provenance"]["checkpoint.mindspeed_ref_model"] == {
        "source": "derived:checkpoint.mindspeed_load",
        "why": "the policy's initial weights (the reference never follows the trained policy)"}


def test_mindspeed_config_uses_only_known_scalar_keys(guide_build):
    for name in ("dpo_qwen3_30b.yaml", "dpo_qwen3_30b_resume.yaml"):
        cfg = yaml.safe_load((guide_build / "mindspeed-rl" / name).read_text())
        assert cfg["defaults"] == [{"model": ["qwen3_30b_a3b"]}]
        train = cfg["megatron_training"]
        # `model` selects the model YAML entry; MindSpeed-RL pops it before building MegatronConfig
        assert set(train) - {"model"} <= MINDSPEED_FIELDS, set(train) - MINDSPEED_FIELDS
        assert all(not isinstance(v, (list, dict)) for v in train.values())
        assert train["ref_model"] == "./model_weights/Qwen3-30B-TP2-PP8-EP1"
        assert train["norm_epsilon"] == 1e-6
        assert "no_save_optim" not in train and "no_save_rng" not in train
    model = yaml.safe_load((guide_build / "mindspeed-rl/model/qwen3_30b_a3b.yaml").read_text())
    assert list(model) == ["qwen3_30b_a3b"]
    assert set(model["qwen3_30b_a3b"]) <= MINDSPEED_FIELDS
    assert model["qwen3_30b_a3b"]["norm_epsilon"] == 1e-6
    resume = yaml.safe_load((guide_build / "mindspeed-rl/dpo_qwen3_30b_resume.yaml").read_text())["megatron_training"]
    assert resume["load"] == "./ckpt" and "finetune" not in resume and "no_load_optim" not in resume


# MindSpeed-RL DataHandlerConfig keys (shared/reference/mindspeed-dpo-facts.md §9); unknown keys are an error there
DATA_HANDLER_KEYS = {
    "input", "output_prefix", "handler_name", "tokenizer_type", "tokenizer_name_or_path", "tokenizer_not_use_fast",
    "vocab_file", "merge_file", "prompt_type", "prompt_type_path", "enable_thinking", "seq_length", "map_keys",
    "json_keys", "dataset_additional_keys", "workers", "n_subs", "pack", "neat_pack", "append_eod", "streaming",
    "split_sentences", "keep_newlines", "interleave_probs", "overwrite_cache", "seed", "cache_dir", "script_data_dir",
    "make_vocab_size_divisible_by", "pad_vocab_size_to", "placeholder_token", "reward_tokens", "dataset_impl",
    "log_interval", "merge_group_keys",
}


def test_mindspeed_dataset_config_is_the_guides(guide_build):
    cfg = yaml.safe_load((guide_build / "mindspeed-rl/datasets/qwen3_30b.yaml").read_text())
    assert set(cfg) <= DATA_HANDLER_KEYS
    assert cfg["handler_name"] == "AlpacaStylePairwiseHandler" and cfg["prompt_type"] == "qwen3"
    assert cfg["map_keys"] == {"prompt": "question", "query": "", "system": "system"}
    assert cfg["enable_thinking"] is True and cfg["seq_length"] == 4096 and cfg["output_prefix"] == "./dataset/dpo"


def test_converter_gets_tp_extend_ep_exactly_when_training_sets_it(tmp_path):
    for extend in (False, True):
        out = tmp_path / str(extend) / "qwen3_30b"
        build(RECIPES / "qwen3_30b.yaml", [f"parallelism.moe_tp_extend_ep={str(extend).lower()}",
                                           "runtime=mindspeed-rl"], out=out)
        convert = (out / "mindspeed-rl/convert/hf_to_mcore.sh").read_text()
        train = yaml.safe_load((out / "mindspeed-rl/dpo_qwen3_30b.yaml").read_text())["megatron_training"]
        assert ("--moe-tp-extend-ep" in convert) is extend is bool(train.get("moe_tp_extend_ep"))
        assert "--target-tensor-parallel-size 2 \\\n  --target-pipeline-parallel-size 8" in convert
        assert "--moe-grouped-gemm" in convert and "--model-type-hf qwen3-moe" in convert


def test_packing_reaches_the_runtime_and_leaves_mindspeed_out(tmp_path):
    out = tmp_path / "packed"
    build(RECIPES / "qwen3_30b.yaml", ["training.packing=true", "~training.length_stats", "training.mean_seq_length=1500"],
          out=out)
    assert megatron_args.parse([f"@{out / 'megatron.args'}"]).dpoc_packing
    assert not megatron_args.parse([f"@{RECIPES.parent / 'tests/golden/qwen3_30b/megatron.args'}"]).dpoc_packing
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped_targets"] == {"mindspeed-rl": [
        "training.packing: true: MindSpeed-RL's pairwise DPO data has no packing (each micro-batch holds whole "
        "padded pairs); valid: false, or runtime=dpoc"]}
    assert not (out / "mindspeed-rl").exists()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["training"]["packing"] and plan["provenance"]["training.packing"]["source"].startswith("user")
    # budgets of 2 x 1 x 4096 tokens hold 2 pairs of 2 x 1500: 64 pairs -> 32 micro-batches, 16 per dp rank
    assert plan["estimate"]["packing"] == {"budget_tokens": 8192, "micro_batches": 16, "pairs_per_micro_batch": 2.0,
                                           "fill": 0.7324}


def test_context_parallel_reaches_the_runtime_on_an_attention_that_has_it(tmp_path):
    build(RECIPES / "tiny_cpu.yaml", ["parallelism.cp=2"], out=tmp_path / "cpu")
    args = megatron_args.parse([f"@{tmp_path / 'cpu' / 'megatron.args'}"])
    assert (args.context_parallel_size, args.dpoc_core_attention) == (2, "auto")  # sdpa is the cpu's
    # on cuda the runtime's auto would pick TransformerEngine's attention, which it does not run at cp > 1
    build(RECIPES / "tiny_cpu.yaml", ["parallelism.cp=2", "hardware.device=cuda", "hardware.backend=nccl"],
          out=tmp_path / "cuda")
    args = megatron_args.parse([f"@{tmp_path / 'cuda' / 'megatron.args'}"])
    assert (args.context_parallel_size, args.dpoc_core_attention) == (2, "sdpa")
    build(RECIPES / "qwen3_30b.yaml", ["parallelism.cp=2"], out=tmp_path / "npu")  # npu_fusion_attention's
    args = megatron_args.parse([f"@{tmp_path / 'npu' / 'megatron.args'}"])
    assert (args.context_parallel_size, args.dpoc_core_attention) == (2, "auto")


def test_legacy_converter_for_llama(tmp_path):
    out = tmp_path / "llama"
    build(RECIPES / "qwen3_30b_a2.yaml", ["model.preset=llama3-8b", "dataset.template=llama3"], out=out)
    convert = (out / "mindspeed-rl/convert/hf_to_mcore.sh").read_text()
    assert "convert_ckpt.py" in convert and "--model-type GPT" in convert and "--model-type-hf llama2" in convert


def test_same_recipe_gives_byte_identical_builds(tmp_path):
    a, b = tmp_path / "a" / "x", tmp_path / "b" / "x"  # the directory's name names the build
    for out in (a, b):
        proc = run_subprocess("build", RECIPES / "qwen3_30b.yaml", "-o", out)
        assert proc.returncode == 0, proc.stderr
    assert files_of(a) == files_of(b)


def test_failed_build_leaves_the_old_build_untouched(tmp_path, dpoc_cli):
    out = tmp_path / "b"
    assert dpoc_cli("build", RECIPES / "qwen3_30b.yaml", "-o", out).code == 0
    before = files_of(out)
    assert dpoc_cli("build", RECIPES / "qwen3_30b.yaml", "parallelism.tp=3", "-o", out).code == 2
    assert files_of(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary siblings left


def test_rebuild_replaces_the_whole_directory(tmp_path, dpoc_cli):
    out = tmp_path / "b"
    assert dpoc_cli("build", RECIPES / "qwen3_30b.yaml", "-o", out).code == 0
    (out / "stale.txt").write_text("from an older build")
    assert dpoc_cli("build", RECIPES / "qwen3_30b.yaml", "training.lr=1e-7", "-o", out).code == 0
    assert not (out / "stale.txt").exists()
    assert "--lr 1e-07" in (out / "megatron.args").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_write_failure_midway_keeps_old_build(tmp_path, monkeypatch):
    from dpoc.compiler import write as build_module

    out = tmp_path / "b"
    build(RECIPES / "qwen3_30b.yaml", out=out)
    before = files_of(out)
    calls = []
    real_write = Path.write_text

    def failing_write(self, text, *a, **k):
        calls.append(self)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real_write(self, text, *a, **k)

    monkeypatch.setattr(Path, "write_text", failing_write)
    with pytest.raises(OSError):
        build_module.write_tree(out, {f"f{i}.txt": "x" for i in range(10)})
    assert files_of(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_build_does_not_import_torch(tmp_path):
    code = ("import sys; from dpoc.cli import main; rc = main(['build', 'recipes/qwen3_30b.yaml', '-o', sys.argv[1]]);"
            "bad = [m for m in ('torch', 'megatron', 'transformers', 'numpy', 'ray') if m in sys.modules];"
            "print(rc, bad)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stderr


def test_shipped_scripts_pass_shellcheck(guide_build, tmp_path):
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    tiny = tmp_path / "tiny"
    build(RECIPES / "tiny_cpu.yaml", ["dpo.reference=precomputed"], out=tiny)  # node script + reference.sh
    converted = tmp_path / "converted"
    build(RECIPES / "qwen3_30b.yaml", ["checkpoint.init=converted"], out=converted)  # dpoc's convert/hf_to_mcore.sh
    scripts = sorted(guide_build.rglob("*.sh")) + sorted(tiny.rglob("*.sh")) + [converted / "convert/hf_to_mcore.sh"]
    assert len(scripts) == 19 and tiny / "reference.sh" in scripts
    proc = subprocess.run([shellcheck, "--severity=style", *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def stub_tools(tmp_path: Path, one_arg_per_line: bool = False) -> tuple[dict[str, str], Path]:
    """`python` and torchrun stand-ins that record their arguments, so node scripts run without a runtime."""
    stubs, log = tmp_path / "bin", tmp_path / "argv.log"
    stubs.mkdir()
    record = 'for a in "$@"; do printf "%s\\n" "$a"; done' if one_arg_per_line else 'echo "$@"'
    for tool in ("record", "torchrun"):
        (stubs / tool).write_text(f'#!/bin/sh\n{record} >> "{log}"\n')
        (stubs / tool).chmod(0o755)
    route_torchrun(stubs, str(stubs / "record"))
    return {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}, log


HOSTILE = "./data dir/it's \"quoted\" $(touch PWNED) `touch PWNED2`;x"


def test_hostile_paths_stay_literal_when_scripts_run(tmp_path):
    """A node script runs with stub python/torchrun that record their argv: paths arrive verbatim, nothing runs."""
    out = tmp_path / "build"
    build(RECIPES / "tiny_cpu.yaml", [f"dataset.output_prefix={HOSTILE}", f"run_dir={HOSTILE}/run"], out=out)
    env, log = stub_tools(tmp_path, one_arg_per_line=True)
    work = tmp_path / "job"
    work.mkdir()
    proc = subprocess.run(["bash", str(out / "nodes/node-0.sh")], cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    argv = log.read_text().splitlines()
    assert argv[:4] == ["-m", "dpoc", "preflight", str(out)]
    assert f"@{out}/megatron.args" in argv
    proc = subprocess.run(["bash", str(out / "preprocess.sh")], cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (work / "data dir").is_dir()  # mkdir of the literal prefix directory
    assert not list(work.rglob("PWNED*")) and not list(tmp_path.rglob("PWNED*"))
    args = megatron_args.parse([f"@{out / 'megatron.args'}"])
    assert args.data_path == HOSTILE and args.dpoc_run_dir == f"{HOSTILE}/run"


def test_master_address_and_port_overrides(tmp_path):
    out = tmp_path / "build"
    build(RECIPES / "qwen3_30b.yaml", out=out)
    env, log = stub_tools(tmp_path)
    subprocess.run(["bash", str(out / "nodes/node-1.sh")], cwd=tmp_path, env=env, check=True, capture_output=True)
    env.update(DPOC_MASTER_ADDR="10.9.9.9", DPOC_MASTER_PORT="7777")
    subprocess.run(["bash", str(out / "nodes/node-1.sh")], cwd=tmp_path, env=env, check=True, capture_output=True)
    runs = [ln for ln in log.read_text().splitlines() if ln.startswith("--nnodes")]
    assert runs[0].startswith("--nnodes 2 --node_rank 1 --nproc_per_node 16 --master_addr 192.168.1.10 --master_port 6005")
    assert runs[1].startswith("--nnodes 2 --node_rank 1 --nproc_per_node 16 --master_addr 10.9.9.9 --master_port 7777")


def test_resume_mode_is_picked_from_the_save_directory(tmp_path):
    out = tmp_path / "build"
    build(RECIPES / "tiny_cpu.yaml", ["checkpoint.save=ckpt"], out=out)
    env, log = stub_tools(tmp_path)
    subprocess.run(["bash", str(out / "nodes/node-0.sh")], cwd=tmp_path, env=env, check=True, capture_output=True)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt/latest_checkpointed_iteration.txt").write_text("10")
    subprocess.run(["bash", str(out / "nodes/node-0.sh")], cwd=tmp_path, env=env, check=True, capture_output=True)
    bad = subprocess.run(["bash", str(out / "nodes/node-0.sh")], cwd=tmp_path, env={**env, "DPOC_RESUME": "yes"},
                         capture_output=True, text=True)
    preflight, train = ([ln for ln in log.read_text().splitlines() if key in ln and not ln.endswith("--device")]
                        for key in ("-m dpoc preflight", "dpoc.runtime.train"))
    assert preflight[0].startswith(f"-m dpoc preflight {out} --mode fresh --target dpoc --node-rank 0 ")
    assert preflight[1].startswith(f"-m dpoc preflight {out} --mode resume ")
    assert train[0].endswith(f"@{out}/megatron.args") and train[1].endswith(f"@{out}/resume/megatron.args")
    assert bad.returncode == 2 and "DPOC_RESUME must be auto, 1 or 0 (got yes)" in bad.stderr


@pytest.mark.parametrize("recipe, overrides, path, why", [
    ("qwen3_30b.yaml", [], "npu-gmm", "moe_grouped_gemm on, device npu: torch_npu's npu_grouped_matmul"),
    ("qwen3_30b.yaml", ["parallelism.moe_grouped_gemm=false"], "sequential",
     "moe_grouped_gemm off, device npu: megatron-core's SequentialMLP"),
    ("tiny_moe_cpu.yaml", ["hardware.device=cuda", "hardware.backend=nccl", "parallelism.moe_grouped_gemm=true"],
     "torch-grouped-mm", "moe_grouped_gemm on, device cuda: torch._grouped_mm"),
    ("tiny_moe_cpu.yaml", [], "sequential", "moe_grouped_gemm off, device cpu: megatron-core's SequentialMLP"),
    ("tiny_cpu.yaml", [], None, "a dense model has no experts"),
])
def test_the_plan_records_the_experts_path_and_why(tmp_path, recipe, overrides, path, why):
    """layout.moe_experts and its provenance; the runtime gets it as --dpoc-moe-experts."""
    plan, out = build(RECIPES / recipe, overrides, out=tmp_path / "b")
    assert plan.layout.moe_experts == path
    source = dict(plan.provenance)["layout.moe_experts"]
    assert source.source == "derived:layout.moe_experts" and source.why.startswith(why), source.why
    assert megatron_args.parse([f"@{out / 'megatron.args'}"]).dpoc_moe_experts == path


def test_the_node_script_runs_the_device_check_unless_told_not_to(tmp_path):
    """After the preflight and before torchrun: `dpoc preflight BUILD --device`; DPOC_DEVICE_CHECK=0 skips it."""
    out = tmp_path / "build"
    build(RECIPES / "tiny_moe_cpu.yaml", out=out)
    env, log = stub_tools(tmp_path)
    subprocess.run(["bash", str(out / "nodes/node-0.sh")], cwd=tmp_path, env=env, check=True, capture_output=True)
    calls = log.read_text().splitlines()
    checks = [i for i, line in enumerate(calls) if line == f"-m dpoc preflight {out} --device"]
    preflight = next(i for i, line in enumerate(calls) if line.startswith(f"-m dpoc preflight {out} --mode"))
    torchrun = next(i for i, line in enumerate(calls) if line.startswith("--nnodes"))
    assert len(checks) == 1 and preflight < checks[0] < torchrun
    log.write_text("")
    subprocess.run(["bash", str(out / "nodes/node-0.sh")], cwd=tmp_path, env={**env, "DPOC_DEVICE_CHECK": "0"},
                   check=True, capture_output=True)
    assert not [line for line in log.read_text().splitlines() if line.endswith("--device")]


def test_cpu_recipe_skips_mindspeed_with_the_reason(tmp_path, dpoc_cli):
    result = dpoc_cli("build", RECIPES / "tiny_cpu.yaml", "-o", tmp_path / "t")
    assert result.code == 0
    assert not (tmp_path / "t/mindspeed-rl").exists()
    assert [p.name for p in (tmp_path / "t/convert").iterdir()] == ["mcore_to_hf.sh"]  # weights out, even from random
    manifest = json.loads((tmp_path / "t/manifest.json").read_text())
    assert manifest["skipped_targets"]["mindspeed-rl"][0].startswith("checkpoint.init: random: MindSpeed-RL always loads")
    # MindSpeed-RL runs on Ascend NPUs only: a CPU build does not print why it was left out (manifest.json says)
    assert "not rendered" not in result.err
    args = megatron_args.parse([f"@{tmp_path / 't/megatron.args'}"])
    assert args.load is None and args.ref_model is None and args.dpoc_device == "cpu" and not args.bf16


def test_an_npu_build_says_why_mindspeed_rl_is_left_out(tmp_path, dpoc_cli):
    result = dpoc_cli("build", RECIPES / "qwen3_30b.yaml", "dpo.beta=0.2", "-o", tmp_path / "q")
    assert result.code == 0
    assert [line.split(":")[1] for line in result.err.splitlines() if "not rendered" in line] == [
        " target mindspeed-rl not rendered"]


def test_schema_command_prints_the_shipped_schema(dpoc_cli):
    result = dpoc_cli("schema", "recipe")
    assert result.code == 0 and json.loads(result.out) == schemas.schema("recipe")


def test_explain_shows_sources(dpoc_cli):
    result = dpoc_cli("explain", RECIPES / "qwen3_30b.yaml", "training.lr=1e-7")
    rows = {ln.split()[0]: ln for ln in result.out.splitlines()}
    assert "user:command line" in rows["training.lr"]
    assert "preset:qwen3-30b-a3b" in rows["model.num_layers"]
    assert "derived:layout.dp" in rows["layout.dp"] and "world size / (tp·pp·cp)" in rows["layout.dp"]
    assert "derived:layout.sequence_parallel" in rows["layout.sequence_parallel"]
    assert rows["layout.tp"].split()[1:3] == ["2", "user"]


def test_explain_gives_nested_and_estimated_values_their_own_source(dpoc_cli):
    result = dpoc_cli("explain", RECIPES / "qwen3_30b.yaml", "model.moe.topk=4")
    rows = {ln.split()[0]: ln.split(maxsplit=2)[2] for ln in result.out.splitlines() if not ln.startswith("warning")}
    assert rows["hardware.env.HCCL_CONNECT_TIMEOUT"] == "preset:atlas-a3  (from the preset)"
    assert rows["model.moe.num_experts"] == "preset:qwen3-30b-a3b  (from the preset)"
    assert rows["model.moe.topk"] == "user:command line  (from the recipe)"
    assert rows["model.moe.load_balancing"] == "default  (the model schema's default)"
    assert rows["data.map_keys.prompt"] == "user  (from the recipe)"
    assert rows["estimate.memory.peak_gib"].startswith("derived:planner.memory  (per-device memory model")
    assert rows["estimate.throughput.samples_per_s"].startswith("derived:planner.throughput  (")
    assert "samples are preference pairs (pairs/s)" in rows["estimate.throughput.samples_per_s"]
    assert rows["estimate.efficiency.dense"].startswith("derived:planner.calibration  (")
    assert rows["model.name"].startswith("derived:model.preset")


def test_every_resolved_value_says_where_it_came_from_and_why():
    from dpoc.contract.plan import plan_values

    for recipe in sorted(RECIPES.glob("*.yaml")):
        plan = plan_recipe(recipe)
        unexplained = [p for p in plan_values(plan.to_dict()) if not plan.source_of(p).why]
        assert unexplained == [], recipe.name


def test_validate_accepts_every_shipped_recipe(dpoc_cli):
    recipes = sorted(RECIPES.glob("*.yaml"))
    result = dpoc_cli("validate", *recipes)
    assert result.code == 0, result.err
    assert result.out.splitlines() == [f"{r}: ok" for r in recipes]


def test_a_mindspeed_job_from_converted_weights_alone_leaves_the_dpoc_target_out(tmp_path):
    """No HF weights: MindSpeed-RL runs from its per-rank folder; the dpoc runtime has nothing to start from."""
    out = tmp_path / "qwen3_30b"
    build(RECIPES / "qwen3_30b.yaml", ["runtime=mindspeed-rl", "~model.hf_weights", "model.tokenizer=./tok"], out=out)
    assert json.loads((out / "manifest.json").read_text())["skipped_targets"] == {"dpoc": [
        "model.hf_weights: is required to convert the initial weights (or give checkpoint.load, or "
        "checkpoint.init=random)"]}
    assert not (out / "megatron.args").exists() and not (out / "mindspeed-rl/convert").exists()
    train = yaml.safe_load((out / "mindspeed-rl/dpo_qwen3_30b.yaml").read_text())["megatron_training"]
    assert train["load"] == train["ref_model"] == "./model_weights/Qwen3-30B-TP2-PP8-EP1"
