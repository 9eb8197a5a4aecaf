"""Before the first step: every weights problem is refused with one exact line (the flag or file, the field, both
values), and the runtime starts from random weights only when megatron.args says `--dpoc-init random`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from dpoc.contract import megatron_args
from dpoc.contract.errors import DpocError
from dpoc.runtime.weights import weight_sources
from tests.runtime.hf_models import model_flags, save_model
from tests.runtime.synthetic import write_args
from tests.runtime.test_runtime_train import run_module


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_model("llama", tmp_path_factory.mktemp("w") / "llama")


def problems(tmp_path: Path, weights: Path, init: list, model_from: Path | None = None) -> list[str]:
    args_file = write_args(tmp_path / "m.args", "pairs", tmp_path / "run", init=init,
                           model=model_flags(model_from or weights))
    args = megatron_args.parse([f"@{args_file}"])
    with pytest.raises(DpocError) as err:
        weight_sources.sources(args, str(args_file))
    return [str(p).replace(str(args_file), "m.args") for p in err.value.problems]


def hf(path: Path, *more) -> list:
    return [("--dpoc-init", "hf"), ("--dpoc-hf-weights", str(path)), *more]


def test_no_init_is_never_a_random_start(tmp_path, llama):
    assert problems(tmp_path, llama, []) == [
        "m.args: --dpoc-init: missing: the runtime never guesses where the weights come from (valid: hf with "
        "--dpoc-hf-weights, converted with --load and --finetune, random)"]


def test_random_init_takes_no_weights(tmp_path, llama):
    assert problems(tmp_path, llama, [("--dpoc-init", "random"), ("--ref-model", str(llama))]) == [
        "m.args: --ref-model: is given, but --dpoc-init is random: the policy starts from a seeded random init "
        "(valid: drop --ref-model, or another --dpoc-init)"]


@pytest.mark.parametrize(("init", "line"), [
    ([("--dpoc-init", "hf")], "m.args: --dpoc-hf-weights: missing: --dpoc-init hf reads the policy from this "
     "Hugging Face directory"),
    (hf(Path("nowhere")), "m.args: --dpoc-hf-weights: nowhere: no such directory"),
    ([("--dpoc-init", "converted"), ("--load", "LLAMA"), ("--finetune", True)],
     "m.args: --load: LLAMA holds Hugging Face weights (config.json), but --load takes a distributed checkpoint"),
    ([("--dpoc-init", "converted"), ("--load", "LLAMA")],  # --load alone resumes: the reference needs a name
     "m.args: --ref-model: missing: a resumed run's reference is its initial weights, which --load (the save "
     "directory) no longer names"),
    (hf("LLAMA", ("--lora-r", 4), ("--lora-alpha", 8.0), ("--dpoc-lora-base", "LLAMA")),
     "m.args: --dpoc-lora-base: is given, but it names the frozen base of LoRA (--lora-r) on converted weights only "
     "(got --dpoc-init hf; valid: drop it)"),
    ([("--dpoc-init", "converted"), ("--load", "LLAMA"), ("--ref-model", "LLAMA"), ("--lora-r", 4),
      ("--lora-alpha", 8.0)],  # a LoRA resume: the save directory holds only adapters
     "m.args: --dpoc-lora-base: missing: a resumed LoRA run on converted weights reads its frozen base from it (the "
     "start's --load; --load now names the save directory)"),
])
def test_flags_that_cannot_be_honoured(tmp_path, llama, init, line):
    init = [(flag, str(llama) if value == "LLAMA" else value) for flag, value in init]
    assert problems(tmp_path, llama, init) == [line.replace("LLAMA", str(llama))]


def test_a_lora_base_other_than_the_start_is_refused(tmp_path, llama):
    """At a fresh start the base is the policy's --load; --dpoc-lora-base must name it too."""
    start, other = tmp_path / "start", tmp_path / "other"
    for folder in (start, other):
        folder.mkdir()
        (folder / "metadata.json").write_text("{}")
    init = [("--dpoc-init", "converted"), ("--load", str(start)), ("--finetune", True), ("--lora-r", 4),
            ("--lora-alpha", 8.0), ("--dpoc-lora-base", str(other))]
    assert problems(tmp_path, llama, init) == [
        f"m.args: --dpoc-lora-base: {other}, but --load starts the policy from {start}: the base is the policy's "
        "initial weights (valid: the same path)"]


def test_a_directory_without_weights(tmp_path, llama):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert problems(tmp_path, empty, hf(llama, ("--ref-model", str(empty))), model_from=llama) == [
        f"m.args: --ref-model: {empty} holds neither Hugging Face weights (config.json) nor a distributed "
        "checkpoint (metadata.json, or latest_checkpointed_iteration.txt)"]


def test_a_per_rank_checkpoint_is_named_as_such(tmp_path, llama):
    legacy = tmp_path / "legacy"
    (legacy / "iter_0000003/mp_rank_00").mkdir(parents=True)
    (legacy / "latest_checkpointed_iteration.txt").write_text("3\n")
    assert problems(tmp_path, legacy, [("--dpoc-init", "converted"), ("--load", str(legacy)), ("--finetune", True)],
                    model_from=llama) == [
        f"m.args: --load: {legacy}/iter_0000003 is a per-rank Megatron checkpoint (mp_rank_* folders, as MindSpeed-LLM's "
        "converter writes), which the dpoc runtime does not read; valid: a distributed checkpoint from `dpoc convert "
        "hf-to-mcore` (the build's convert/hf_to_mcore.sh), or checkpoint.init hf"]


def test_weights_of_another_architecture(tmp_path, llama):
    flags = [(f, 1 if f == "--num-query-groups" else v) for f, v in model_flags(llama)]
    args_file = write_args(tmp_path / "m.args", "pairs", tmp_path / "run", init=hf(llama), model=flags)
    args = megatron_args.parse([f"@{args_file}"])
    with pytest.raises(DpocError) as err:
        weight_sources.sources(args, "m.args")
    assert [str(p) for p in err.value.problems] == [
        f"{llama}/config.json: num_key_value_heads: 2 does not match --num-query-groups 1 in m.args"]


def test_unreadable_config(tmp_path, llama):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    lines = problems(tmp_path, broken, hf(broken), model_from=llama)
    assert lines == [f"{broken}/config.json: (file): not valid JSON: Expecting property name enclosed in double "
                     "quotes: line 1 column 2 (char 1)"]


def rewrite(source: Path, target: Path, change) -> Path:
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(source / "model.safetensors")
    change(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_a_missing_tensor_and_a_wrong_shape(tmp_path, llama):
    def damage(tensors):
        del tensors["model.layers.1.mlp.up_proj.weight"]
        tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:16]

    bad = rewrite(llama, tmp_path / "bad", damage)
    assert problems(tmp_path, bad, hf(bad)) == [
        f"{bad}: model.layers.0.self_attn.k_proj.weight: shape [16, 64] in model.safetensors, but the model needs "
        "[32, 64]",
        f"{bad}: model.layers.1.mlp.up_proj.weight: missing (the model needs shape [128, 64])"]


def test_a_weight_the_architecture_does_not_have_is_not_dropped_silently(tmp_path, llama):
    bad = rewrite(llama, tmp_path / "extra", lambda t: t.update(
        {"model.layers.0.mlp.shared_expert.down_proj.weight": t["model.layers.0.mlp.down_proj.weight"].clone()}))
    assert problems(tmp_path, bad, hf(bad)) == [
        f"{bad}: model.layers.0.mlp.shared_expert.down_proj.weight: is not a weight of this architecture: loading "
        "would drop it"]


@pytest.mark.slow
def test_the_runtime_exits_2_with_the_line_and_no_traceback(tmp_path, llama):
    config = json.loads((llama / "config.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    args_file = write_args(tmp_path / "m.args", str(tmp_path / "pairs"), tmp_path / "run", init=hf(other),
                           model=model_flags(llama))
    done = run_module(["-m", "dpoc.runtime.train", f"@{args_file}"], 1)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"{other}/config.json: num_hidden_layers: 3 does not match --num-layers 2 in {args_file}")
    assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()
