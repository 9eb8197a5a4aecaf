"""Node preflight: the checks that need the node's files, with one line per problem and exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from dpoc.compiler.pipeline import build
from dpoc.data import identity
from dpoc.data.pairwise import dataset_files, stats_path
from tests.conftest import RECIPES, REPO


def touch_dataset(prefix: str, made_by: Path | None = None) -> None:
    """Empty stand-ins for the eight dataset files (preflight checks presence only) and, when `made_by` names a
    build, the stats its preprocess.yaml would record here; without it, a MindSpeed-LLM dataset (no stats)."""
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    for path in dataset_files(prefix):
        open(path, "wb").close()
    if made_by is not None:
        config = yaml.safe_load((made_by / "preprocess.yaml").read_text())
        Path(stats_path(prefix)).write_text(json.dumps({"settings": identity.settings(config)}))


def test_preflight_names_what_is_missing_then_passes(tmp_path, dpoc_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "b"
    build(RECIPES / "tiny_cpu.yaml", ["checkpoint.save=ck"], out=out)
    result = dpoc_cli("preflight", out)
    assert result.code == 2
    assert result.err.splitlines() == [
        "runs/b/dataset/orca_tiny_packed_chosen_input_ids_document.bin: (file): missing preprocessed dataset (8 of 8 "
        f"files absent); run bash {out}/preprocess.sh first",
        "./assets/tiny/tokenizer: (directory): tokenizer directory not found on this node",
    ]
    os.makedirs("assets/tiny/tokenizer")
    touch_dataset("runs/b/dataset/orca_tiny", made_by=out)
    assert dpoc_cli("preflight", out).err == ""
    result = dpoc_cli("preflight", out, "--mode", "resume")
    assert result.code == 2 and result.err == ("ck: latest_checkpointed_iteration.txt: no checkpoint to resume from; "
                                               "valid: DPOC_RESUME=0\n")


def test_builds_of_one_recipe_keep_apart_and_a_dataset_made_for_another_is_refused(tmp_path, dpoc_cli, monkeypatch):
    """The issue's scenario: a `training.seq_length=32` build's preprocess.sh rewrote the dataset another build of
    the same recipe trains on. Each build now has its own run directory (and, by default, its own dataset);
    where two builds pin one dataset, the preflight and the runtime refuse the one made for the other build."""
    from dpoc.contract.errors import DpocError
    from dpoc.runtime.step.data import PairwiseDataset

    monkeypatch.chdir(REPO)  # the tiny recipe's paths are relative to the repository root
    full, short = tmp_path / "full", tmp_path / "short"
    plans = {out: build(RECIPES / "tiny_cpu.yaml", overrides, out=out)[0]
             for out, overrides in ((full, []), (short, ["training.seq_length=32"]))}
    assert [(p.name, p.run_dir, p.data.output_prefix) for p in plans.values()] == [
        ("full", "runs/full", "runs/full/dataset/orca_tiny"), ("short", "runs/short", "runs/short/dataset/orca_tiny")]

    shared = str(tmp_path / "data" / "orca_tiny")
    for out, overrides in ((full, []), (short, ["training.seq_length=32"])):
        build(RECIPES / "tiny_cpu.yaml", [*overrides, f"dataset.output_prefix={shared}"], out=out)
    assert dpoc_cli("preprocess", short / "preprocess.yaml").code == 0
    result = dpoc_cli("preflight", full)
    assert result.code == 2
    assert result.err == (f"{shared}_stats.json: (dataset): was preprocessed with seq_length 32 (this build: 256): "
                          "another build's preprocess.sh (or an older config) wrote it; run bash "
                          f"{full}/preprocess.sh, or give this build its own dataset.output_prefix\n")
    args_file = str(full / "megatron.args")
    with pytest.raises(DpocError) as exc:
        PairwiseDataset(shared, 256, args_file, "./assets/tiny/tokenizer")
    assert str(exc.value) == (f"{shared}_stats.json: (dataset): was preprocessed with seq_length 32 (this build: "
                              "256): another build's preprocess.sh (or an older config) wrote it; run the "
                              f"preprocess.sh of the build {args_file} belongs to, or give this build its own "
                              "dataset.output_prefix")
    assert dpoc_cli("preprocess", full / "preprocess.yaml").code == 0
    assert dpoc_cli("preflight", full).code == 0
    assert dpoc_cli("preflight", short).code == 2


def test_every_setting_that_shapes_the_dataset_is_compared(tmp_path):
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}")
    (tmp_path / "in.jsonl").write_text("{}\n")
    config = {"input": str(tmp_path / "in.jsonl"), "layout": "auto", "tokenizer": str(tokenizer), "template": "qwen3",
              "enable_thinking": False, "map_keys": {"prompt": "question"}, "seq_length": 64, "truncate": None}
    made = identity.settings(config)
    assert identity.differences(made, identity.settings(config)) == []
    assert identity.differences(made, {**made, "tokenizer": "./elsewhere"}) == []  # the files count, not the path
    assert identity.differences(made, {**made, "tokenizer": "./other", "tokenizer_sha256": "0"}) == [
        f"tokenizer {tokenizer} (this build: ./other, whose files differ)"]
    (tmp_path / "in.jsonl").write_text("{}\n{}\n")
    (tokenizer / "tokenizer.json").write_text('{"model": 1}')
    other = {**config, "template": "chatml", "enable_thinking": True, "map_keys": {}, "truncate": "prompt",
             "layout": "hh-rlhf"}
    assert identity.differences(made, identity.settings(other)) == [
        "layout auto (this build: hh-rlhf)", f"tokenizer {tokenizer} as its files were then (they have changed)",
        "template qwen3 (this build: chatml)", "enable_thinking false (this build: true)",
        "map_keys {prompt: 'question'} (this build: {})", "truncate null (this build: prompt)",
        "an input of 3 bytes (now 6)"]
    assert identity.differences(made, {"seq_length": 64, "input_bytes": None}) == []  # unknown here: not compared


def test_preflight_refuses_an_edited_build(tmp_path, dpoc_cli):
    out = tmp_path / "b"
    build(RECIPES / "qwen3_30b.yaml", ["checkpoint.init=converted"], out=out)
    with open(out / "megatron.args", "a") as f:
        f.write("--lr 1.0\n")
    result = dpoc_cli("preflight", out)
    assert result.code == 2
    assert result.err.splitlines()[0] == (f"{out}/megatron.args: (file): differs from manifest.json: the build was "
                                          "edited or is incomplete; rebuild it with dpoc build")
    assert ("./model_weights/qwen3_30b-mcore: (directory): checkpoint.load not found on this node: neither "
            "Hugging Face weights (config.json) nor a distributed checkpoint (metadata.json); run "
            f"{out}/convert/hf_to_mcore.sh first") in result.err


def test_the_dpoc_runtime_names_a_per_rank_checkpoint_it_cannot_read(tmp_path, dpoc_cli, monkeypatch):
    """A user's MindSpeed-LLM weights given to the dpoc runtime as checkpoint.load (the guide's own per-rank folder
    cannot be: one path for both targets is refused at build, tests/compiler/test_hf_config.py)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "b"
    build(RECIPES / "qwen3_30b.yaml", ["checkpoint.load=./old/Qwen3-30B-TP2-PP8-EP1"], out=out)
    weights = tmp_path / "old/Qwen3-30B-TP2-PP8-EP1"
    os.makedirs(weights / "iter_0000001/mp_rank_00_000")
    (weights / "latest_checkpointed_iteration.txt").write_text("1\n")
    result = dpoc_cli("preflight", out)
    assert result.code == 2
    assert ("old/Qwen3-30B-TP2-PP8-EP1/iter_0000001: (directory): checkpoint.load is a per-rank Megatron "
            "checkpoint (mp_rank_* folders, as MindSpeed-LLM's converter writes), which the dpoc runtime does not "
            "read; valid: a distributed checkpoint from `dpoc convert hf-to-mcore` (the build's "
            "convert/hf_to_mcore.sh), or checkpoint.init hf\n") in result.err


def test_mindspeed_checkpoint_must_have_the_plans_layout(tmp_path, dpoc_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "b"
    build(RECIPES / "qwen3_30b.yaml", ["runtime=mindspeed-rl"], out=out)
    touch_dataset("dataset/dpo")  # as MindSpeed-LLM writes it: no stats, accepted with a warning
    os.makedirs("model_from_hf/Qwen3-30B-A3B")
    weights = tmp_path / "model_weights/Qwen3-30B-TP2-PP8-EP1"
    for tp in range(2):  # converted with pp=4 by mistake
        for pp in range(4):
            os.makedirs(weights / f"iter_0000001/mp_rank_{tp:02d}_{pp:03d}")
    (weights / "latest_checkpointed_iteration.txt").write_text("1\n")
    result = dpoc_cli("preflight", out, "--target", "mindspeed-rl")
    assert result.code == 2
    assert result.err == (f"./model_weights/Qwen3-30B-TP2-PP8-EP1/iter_0000001: (layout): holds 8 rank folders, but "
                          "tp=2 pp=8 ep=1 needs 16 (mp_rank_00_000 … mp_rank_01_007); MindSpeed-RL checkpoints are per "
                          f"rank: reconvert with {out}/mindspeed-rl/convert/hf_to_mcore.sh\n")
    for tp in range(2):
        for pp in range(4, 8):
            os.makedirs(weights / f"iter_0000001/mp_rank_{tp:02d}_{pp:03d}")
    result = dpoc_cli("preflight", out, "--target", "mindspeed-rl")
    assert result.code == 0
    assert result.err == (f"{out}: warning: ./dataset/dpo: no dpo_stats.json (a dataset preprocessed by "
                          "MindSpeed-LLM?): its length statistics are unknown, and its tokenizer, template and "
                          "seq_length cannot be checked against this build\n")
