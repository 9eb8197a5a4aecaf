"""Shared fixtures: one tiny tokenizer per session (built offline with `tokenizers`), writers, a runner."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dpoc.data.config import build_config
from dpoc.data.pipeline import preprocess

REPO = Path(__file__).resolve().parents[2]


def _assets_script():
    spec = importlib.util.spec_from_file_location("make_tiny_assets", REPO / "assets" / "make_tiny_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    assets = _assets_script()
    out = tmp_path_factory.mktemp("tokenizer")
    extra = "What is 2 + 3? 2 + 3 = 5. The capital of France is Paris."
    corpus = [assets.GENERAL_TEXT, extra, *assets.SYSTEMS]
    assets.build_tokenizer(out, corpus)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


ORCA_ROWS = [
    {"system": "You are a helpful assistant.", "question": "What is 2 + 3?", "chosen": "2 + 3 = 5.",
     "rejected": "2 + 3 = 6."},
    {"system": "", "question": "Name the capital of France.", "chosen": "Paris.",
     "rejected": "Rome, I think."},
    {"system": "", "question": "Say hello.", "chosen": "Hello!", "rejected": "No."},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def orca_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "orca.jsonl", ORCA_ROWS)


@pytest.fixture
def run(tmp_path, tokenizer_dir):
    """run(input, **config) -> (stats, output prefix); defaults fit the orca-style rows above."""

    def _run(input_path, **values):
        config = {"input": str(input_path), "tokenizer": str(tokenizer_dir),
                  "output_prefix": str(tmp_path / "out" / "dpo"), "seq_length": 256, "template": "chatml",
                  "map_keys": {"prompt": "question", "query": "", "system": "system"}, **values}
        return preprocess(build_config(config, "test.yaml")), config["output_prefix"]

    return _run


def output_names(prefix: str) -> list[str]:
    directory = Path(prefix).parent
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []
