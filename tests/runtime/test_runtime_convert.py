"""`dpoc convert` both ways, and DPO's first step from real weights.

- HF → distributed checkpoint → HF is bit-exact (names, dtypes, values), dense and MoE; a training save
  directory (model tensors next to optimizer and RNG entries) converts back too; transformers loads the output.
- The first step's metrics (before any update) from two different HF checkpoints for policy and reference
  equal a plain transformers computation; the converted checkpoints loaded at tp2 give the same.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from megatron.core.datasets.indexed_dataset import IndexedDataset
from safetensors import safe_open

from dpoc.compiler.pipeline import build
from dpoc.contract import megatron_args
from dpoc.contract.architecture import Architecture
from dpoc.contract.errors import DpocError
from dpoc.contract.hf_config import architecture, read_config
from dpoc.runtime.weights import weight_map, weight_sources
from dpoc.runtime.weights.weight_identity import describe_weights
from dpoc.runtime.weights.weight_map import index_axes
from dpoc.runtime.weights.weight_sources import COMMON_KEY
from tests.conftest import RECIPES, script_env
from tests.runtime.hf_models import model_flags, save_model
from tests.runtime.synthetic import write_args, write_pairs
from tests.runtime.test_runtime_train import ROOT, metrics, run_module

TOKENIZER = ROOT / "assets/tiny/tokenizer"
BETA = 0.1


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Policy A (dense, sharded safetensors), reference B (same architecture, other weights), an MoE model M;
    every conversion done once by one driver process, its exit codes and stderr kept."""
    tmp = tmp_path_factory.mktemp("convert")
    save_model("qwen3", tmp / "A", seed=0)
    save_model("qwen3", tmp / "B", seed=1)
    save_model("qwen3_moe", tmp / "M", seed=2)
    config = read_config(tmp / "A", "", "")
    (tmp / "plan.json").write_text(json.dumps({"model": architecture(config, "A")}))
    steps = [
        ["cli", "convert", "hf-to-mcore", tmp / "A", tmp / "mc/A"],
        ["cli", "convert", "mcore-to-hf", tmp / "mc/A", tmp / "out/A", "--max-shard-size", "60KB"],
        ["tracked", "convert", "hf-to-mcore", tmp / "M", tmp / "mc/M"],
        ["tracked", "convert", "mcore-to-hf", tmp / "mc/M", tmp / "out/M"],
        ["cli", "convert", "hf-to-mcore", tmp / "B", tmp / "mc/B"],
        ["training-checkpoint", tmp / "mc/A", tmp / "save", 3],
        ["cli", "convert", "mcore-to-hf", tmp / "save", tmp / "out/trained", "--plan", tmp / "plan.json",
         "--tokenizer", TOKENIZER],
        ["cli", "convert", "hf-to-mcore", tmp / "B", tmp / "mc/A"],
        ["cli", "convert", "mcore-to-hf", tmp / "save", tmp / "out/no-plan"],
        ["checkpoint-problems", tmp / "mc/A", tmp / "save/iter_0000003", "--ffn-hidden-size=96"],
    ]
    (tmp / "steps.json").write_text(json.dumps([[str(x) for x in step] for step in steps]))
    done = run_module(["-m", "tests.runtime.convert_driver", str(tmp / "steps.json")], 1)
    assert done.returncode == 0, done.stderr[-4000:]
    (tmp / "codes.json").write_text(done.stdout.strip().splitlines()[-1])
    (tmp / "stderr.txt").write_text(done.stderr)
    return tmp


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return out


@pytest.mark.slow
def test_every_conversion_ran_and_the_refusals_are_exit_2(work):
    codes = json.loads((work / "codes.json").read_text())
    assert [c["code"] if isinstance(c, dict) else c for c in codes[:-1]] == [0, 0, 0, 0, 0, 0, 0, 2, 2]


def test_conversions_stream_one_tensor_at_a_time(work):
    """Every tensor is read only when the writer is ready for it (R), and written (W) before the next is read:
    the converters never hold more than one (bench/weights.py measures the memory)."""
    hf_to_mcore, mcore_to_hf = json.loads((work / "codes.json").read_text())[2:4]
    for events, tensors_read in ((hf_to_mcore["events"], 41), (mcore_to_hf["events"], 33)):  # MoE M
        assert events.count("R") == tensors_read and "RR" not in events and events.endswith("W")


def test_refusals_name_the_directory(work):
    err = (work / "stderr.txt").read_text()
    assert f"{work}/mc/A: OUT_DIR: already exists (valid: remove it, or name another directory)" in err
    assert (f"{work}/save/iter_0000003: (architecture): the checkpoint records no config.json (it was not written "
            "by dpoc convert): give --plan BUILD/plan.json") in err
    assert "hf-to-mcore: 21/21 tensors  100.0% of" in err and "mcore-to-hf: " in err
    assert not list(work.glob("mc/.*")) and not list(work.glob("out/.*"))  # no temporary siblings left


@pytest.mark.parametrize(("source", "out"), [("A", "out/A"), ("M", "out/M"), ("A", "out/trained")])
def test_hf_to_mcore_to_hf_is_bit_exact(work, source, out):
    original, back = tensors(work / source), tensors(work / out)
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_the_export_is_a_standard_hugging_face_directory(work):
    assert len(list((work / "out/A").glob("model-*-of-*.safetensors"))) > 1
    index = json.loads((work / "out/A/model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors(work / "A"))
    tokens = torch.tensor([[1, 5, 9, 3, 77, 100]])
    for source, out in (("A", "out/A"), ("M", "out/M"), ("A", "out/trained")):
        theirs = transformers.AutoModelForCausalLM.from_pretrained(work / source).eval()
        ours = transformers.AutoModelForCausalLM.from_pretrained(work / out).eval()
        with torch.no_grad():
            assert torch.equal(ours(tokens).logits, theirs(tokens).logits), out
    assert sorted(p.name for p in (work / "out/trained").iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert json.loads((work / "out/A/generation_config.json").read_text()) == json.loads(
        (work / "A/generation_config.json").read_text())


def test_the_checkpoint_holds_every_weight_and_records_its_source(work):
    from torch.distributed.checkpoint import FileSystemReader

    arch = Architecture.of(architecture(read_config(work / "M", "", ""), "M"))
    stored = FileSystemReader(str(work / "mc/M")).read_metadata().state_dict_metadata
    layers = {0: (), 1: (arch.num_layers,), 2: (arch.num_layers, arch.num_experts)}
    expected = {key: (*layers[index_axes(key)], *weight_map.hf_shape(key, index, arch))
                for key, index in weight_map.units(arch)}
    assert {k: tuple(v.size) for k, v in stored.items() if hasattr(v, "size")} == expected
    record = torch.load(work / "mc/A/common.pt", weights_only=True)[COMMON_KEY]
    assert record["source"] == describe_weights(str(work / "A"))
    assert record["hf_config"] == json.loads((work / "A/config.json").read_text())


def test_a_checkpoint_of_another_architecture_is_refused(work, tmp_path):
    """A converted checkpoint: its recorded config.json, before any process group. Any checkpoint: its global
    shapes against the built model's (here a training save without a record, and another ffn size)."""
    flags = [(f, 3 if f == "--num-layers" else v) for f, v in model_flags(work / "A")]
    args_file = write_args(tmp_path / "m.args", "pairs", tmp_path / "run", model=flags, init=[
        ("--dpoc-init", "converted"), ("--load", str(work / "mc/A")), ("--finetune", True)])
    with pytest.raises(DpocError) as err:
        weight_sources.sources(megatron_args.parse([f"@{args_file}"]), "m.args")
    assert [str(p) for p in err.value.problems] == [
        f"{work}/mc/A/common.pt (dpoc_weights.hf_config): num_hidden_layers: 2 does not match --num-layers 3 in "
        "m.args"]
    shown = f"{work}/save/iter_0000003"
    assert json.loads((work / "codes.json").read_text())[-1] == [
        f"{shown}: decoder.layers.mlp.linear_fc1.weight: global shape [2, 256, 64] in the checkpoint, but the model "
        "needs [2, 192, 64]",
        f"{shown}: decoder.layers.mlp.linear_fc2.weight: global shape [2, 64, 128] in the checkpoint, but the model "
        "needs [2, 64, 96]"]


def test_the_content_hash_tells_weights_apart(work):
    a, b = describe_weights(str(work / "A")), describe_weights(str(work / "B"))
    assert a["kind"] == b["kind"] == "hf" and a["sha256"] != b["sha256"]
    assert describe_weights(str(work / "save"))["path"] == str(work / "save/iter_0000003")


def read_pairs(prefix: str) -> list[dict[str, list[int]]]:
    parts = {p: IndexedDataset(f"{prefix}_packed_{p}_document") for p in
             ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")}
    return [{p: parts[p][i].tolist() for p in parts} for i in range(len(parts["chosen_input_ids"]))]


def sequence_logp(model, ids: list[int], labels: list[int]) -> float:
    """Sum of log p(token) over the response: position i predicts token i + 1 where that label is not -100."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    logp = F.log_softmax(logits.double(), -1)
    return sum(float(logp[i, labels[i + 1]]) for i in range(len(ids) - 1) if labels[i + 1] != -100)


def transformers_first_step(policy_dir: Path, reference_dir: Path, pairs: list[dict]) -> dict[str, float]:
    policy = transformers.AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    return dpo_first_step(policy, reference, pairs)


def dpo_first_step(policy, reference, pairs: list[dict]) -> dict[str, float]:
    """The sigmoid DPO step's metrics for two Hugging Face models, averaged over the pairs."""
    rows = []
    for pair in pairs:
        pc = sequence_logp(policy, pair["chosen_input_ids"], pair["chosen_labels"])
        pr = sequence_logp(policy, pair["rejected_input_ids"], pair["rejected_labels"])
        rc = sequence_logp(reference, pair["chosen_input_ids"], pair["chosen_labels"])
        rr = sequence_logp(reference, pair["rejected_input_ids"], pair["rejected_labels"])
        z = (pc - pr) - (rc - rr)
        rows.append({"loss": -math.log(1 / (1 + math.exp(-BETA * z))), "rewards/chosen": BETA * (pc - rc),
                     "rewards/rejected": BETA * (pr - rr), "rewards/accuracies": float(pc - rc > pr - rr),
                     "rewards/margins": BETA * z, "logps/chosen": pc, "logps/rejected": pr})
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}


@pytest.fixture(scope="module")
def pairs(work) -> str:
    return write_pairs(work / "pairs", pairs=8, seed=5)


def first_step(work: Path, name: str, processes: int, init: list, layout=()) -> dict[str, float]:
    args_file = write_args(work / f"{name}.args", str(work / "pairs"), work / "runs" / name, steps=1,
                           global_batch=8, micro_batch=2, model=model_flags(work / "A"), init=init,
                           layout=list(layout))
    done = run_module(["-m", "dpoc.runtime.train", f"@{args_file}"], processes)
    assert done.returncode == 0, done.stderr[-4000:]
    return metrics(work / "runs" / name)[0]


@pytest.fixture(scope="module")
def hf_first_step(work, pairs) -> dict[str, float]:
    return first_step(work, "hf", 1, [("--dpoc-init", "hf"), ("--dpoc-hf-weights", str(work / "A")),
                                      ("--ref-model", str(work / "B"))])


KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected")


@pytest.mark.slow
def test_first_step_from_two_hf_checkpoints_equals_transformers(work, pairs, hf_first_step):
    expected = transformers_first_step(work / "A", work / "B", read_pairs(pairs))
    assert expected["rewards/margins"] != 0  # the reference really is other weights
    for key in KEYS:
        assert hf_first_step[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    log = (work / "runs/hf/train.log").read_text()
    assert f"weights: policy from hf {work / 'A'}, reference from hf {work / 'B'}" in log


@pytest.mark.slow
def test_converted_checkpoints_at_tp2_give_the_hf_first_step(work, hf_first_step):
    got = first_step(work, "converted-tp2", 2, [
        ("--dpoc-init", "converted"), ("--load", str(work / "mc/A")), ("--finetune", True),
        ("--ref-model", str(work / "mc/B"))], layout=[("--tensor-model-parallel-size", 2)])
    for key in KEYS:
        assert got[key] == pytest.approx(hf_first_step[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
def test_the_builds_convert_script_writes_the_folder_its_node_scripts_load(work, pairs, tmp_path):
    """What a user runs, in the job's working directory: the build's convert/hf_to_mcore.sh writes the dpoc
    target's own folder (./model_weights/<recipe>-mcore, never MindSpeed-RL's per-rank one), and launch.sh trains
    from it: the first step's log-probs are transformers' on the same weights."""
    out = tmp_path / "job"
    build(RECIPES / "tiny_cpu.yaml", ["~model.preset", f"model.hf_weights={work / 'A'}", f"model.tokenizer={TOKENIZER}",
                                      "checkpoint.init=converted", f"dataset.output_prefix={pairs}",
                                      "training.train_iters=1", "training.warmup_iters=0", "hardware.devices_per_node=1"],
          out=out)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["checkpoint"]["load"] == "./model_weights/tiny_cpu-mcore"
    assert plan["provenance"]["checkpoint.load"]["source"] == "derived:model.hf_weights"
    for script in ("convert/hf_to_mcore.sh", "launch.sh"):
        done = subprocess.run(["bash", str(out / script)], cwd=tmp_path, env=script_env(), capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "model_weights/tiny_cpu-mcore/metadata.json").is_file()
    log = (tmp_path / "runs/job/train.log").read_text()
    assert ("weights: policy from checkpoint ./model_weights/tiny_cpu-mcore, reference from checkpoint "
            "./model_weights/tiny_cpu-mcore") in log
    got = metrics(tmp_path / "runs/job")[0]
    expected = transformers_first_step(work / "A", work / "A", read_pairs(pairs))
    for key in ("logps/chosen", "logps/rejected", "loss"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
