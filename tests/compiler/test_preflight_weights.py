"""The node preflight and the runtime's loader read each safetensors header and check that its tensors' byte
ranges cover the file exactly: a cut download is one line naming the file (exit 2), never a traceback."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from dpoc.compiler.pipeline import build
from dpoc.contract.errors import DpocError
from dpoc.runtime.weights import safetensors_header
from dpoc.runtime.weights.hf_weights import HfWeights
from tests.runtime.hf_models import save_model

RECIPE = """\
model: {hf_weights: ./weights}
hardware: {preset: cpu, devices_per_node: 2}
dataset: {path: ./data.jsonl}
training: {seq_length: 64, global_batch_size: 8, train_iters: 2, lr: 1.0e-4}
parallelism: {tp: 1, pp: 1, micro_batch_size: 1}
"""


@pytest.fixture
def job(tmp_path, monkeypatch) -> Path:
    """A build that names only Hugging Face weights (one model.safetensors), in its working directory."""
    monkeypatch.chdir(tmp_path)
    save_model("qwen2", tmp_path / "weights")
    (tmp_path / "r.yaml").write_text(RECIPE)
    build("r.yaml", out=tmp_path / "b")
    return tmp_path


def cut(path: Path, by: int) -> int:
    size = path.stat().st_size
    os.truncate(path, size - by)
    return size - by


def test_a_whole_file_passes_and_a_cut_one_fails_preflight_with_one_line(job, dpoc_cli):
    weights = job / "weights/model.safetensors"
    assert safetensors_header.problems(job / "weights") == []
    assert "weights/model.safetensors" not in dpoc_cli("preflight", job / "b").err
    length = struct.unpack("<Q", weights.read_bytes()[:8])[0]
    expected = weights.stat().st_size - 8 - length
    held = cut(weights, 100) - 8 - length
    result = dpoc_cli("preflight", job / "b")
    assert result.code == 2
    line = (f"weights/model.safetensors: (file): truncated: its header lists {expected} bytes of tensors, the file "
            f"holds {held} after the header; valid: download or save the weights again")
    assert [e for e in result.err.splitlines() if "safetensors" in e] == [line]
    # the runtime's loader (training, the converter) stops on the same line before safe_open
    with pytest.raises(DpocError) as err:
        HfWeights("weights")
    assert str(err.value) == line


def test_a_header_cut_short_and_trailing_bytes_are_named(tmp_path):
    save_model("qwen2", tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data + b"\0" * 8)
    assert [p.message.split(":")[0] for p in safetensors_header.problems(tmp_path)] == ["has trailing bytes"]
    weights.write_bytes(data[:100])
    assert [str(p) for p in safetensors_header.problems(tmp_path)] == [
        f"{weights}: (file): truncated: 100 bytes, shorter than its own header says; valid: download or save the "
        "weights again"]


def test_every_shard_an_index_names_is_checked(tmp_path):
    save_model("qwen3", tmp_path)  # sharded, with model.safetensors.index.json
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and safetensors_header.problems(tmp_path) == []
    shards[0].unlink()
    cut(shards[1], 4)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert shards[0].name in index["weight_map"].values()
    found = [(Path(p.file).name, p.message.split(",")[0].split(":")[0]) for p in safetensors_header.problems(tmp_path)]
    assert found == [(shards[0].name, "missing"), (shards[1].name, "truncated")]
