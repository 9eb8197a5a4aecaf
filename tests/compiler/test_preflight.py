"""Node preflight: the checks that need the node's files, with one line per problem and exit 2."""

from __future__ import annotations

import os

from dpoc.compile import build
from dpoc.data.pairwise import output_files
from tests.conftest import RECIPES


def touch_dataset(prefix: str) -> None:
    """Empty stand-ins for every file a finished preprocessing run leaves (preflight checks presence only)."""
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    for path in output_files(prefix):
        open(path, "wb").close()


def test_preflight_names_what_is_missing_then_passes(tmp_path, dpoc_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "b"
    build(RECIPES / "tiny_cpu.yaml", ["checkpoint.save=ck"], out=out)
    result = dpoc_cli("preflight", out)
    assert result.code == 2
    assert result.err.splitlines() == [
        "./runs/tiny_cpu/dataset/orca_tiny_packed_chosen_input_ids_document.bin: (file): missing preprocessed "
        f"dataset (9 of 9 files absent); run {out}/preprocess.sh first",
        "./assets/tiny/tokenizer: (directory): tokenizer directory not found on this node",
    ]
    touch_dataset("runs/tiny_cpu/dataset/orca_tiny")
    os.makedirs("assets/tiny/tokenizer")
    assert dpoc_cli("preflight", out).code == 0
    result = dpoc_cli("preflight", out, "--mode", "resume")
    assert result.code == 2 and result.err == ("ck: latest_checkpointed_iteration.txt: no checkpoint to resume from; "
                                               "valid: DPOC_RESUME=0\n")


def test_preflight_refuses_an_edited_build(tmp_path, dpoc_cli):
    out = tmp_path / "b"
    build(RECIPES / "qwen3_30b.yaml", out=out)
    with open(out / "megatron.args", "a") as f:
        f.write("--lr 1.0\n")
    result = dpoc_cli("preflight", out)
    assert result.code == 2
    assert result.err.splitlines()[0] == (f"{out}/megatron.args: (file): differs from manifest.json: the build was "
                                          "edited or is incomplete; rebuild it with dpoc build")
    assert ("./model_weights/Qwen3-30B-TP2-PP8-EP1: (directory): checkpoint.load not found on this node: neither "
            "Hugging Face weights (config.json) nor a distributed checkpoint (metadata.json); run "
            f"{out}/convert/hf_to_mcore.sh first") in result.err


def test_mindspeed_checkpoint_must_have_the_plans_layout(tmp_path, dpoc_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "b"
    build(RECIPES / "qwen3_30b.yaml", ["runtime=mindspeed-rl"], out=out)
    touch_dataset("dataset/dpo")
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
    assert dpoc_cli("preflight", out, "--target", "mindspeed-rl").code == 0
