"""The converted Hugging Face directory keeps the special token ids a generating model needs: config.json and
generation_config.json carry bos/eos/pad from the source's config.json, else from the tokenizer, also when
`--plan` (not the checkpoint's record) gives the architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpoc.contract.hf_config import architecture, read_config
from tests.conftest import REPO, run_subprocess
from tests.runtime.hf_models import converted_qwen2, save_model
from tests.runtime.test_runtime_convert_damaged import published_save

SPECIAL = ("bos_token_id", "eos_token_id", "pad_token_id")


def converted(tmp: Path, hf: Path, *args: str, mcore: Path | None = None) -> tuple[dict, dict]:
    """The special token ids of config.json and generation_config.json after HF -> save directory -> HF
    (`mcore`: the HF directory's conversion, when already made)."""
    (tmp / "plan.json").write_text(json.dumps({"model": architecture(read_config(hf, "", ""), str(hf))}))
    save = published_save(hf, tmp / "save", mcore)
    done = run_subprocess("convert", "mcore-to-hf", save, tmp / "out", "--plan", tmp / "plan.json", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return tuple({k: v for k, v in json.loads((tmp / "out" / name).read_text()).items() if k in SPECIAL}
                 for name in ("config.json", "generation_config.json"))


@pytest.mark.slow
def test_the_source_configs_token_ids_are_kept(tmp_path):
    hf = save_model("qwen2", tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "bos_token_id": 4, "eos_token_id": 5, "pad_token_id": 3}))
    (hf / "generation_config.json").unlink(missing_ok=True)
    ids = {"bos_token_id": 4, "eos_token_id": 5, "pad_token_id": 3}
    assert converted(tmp_path, hf) == (ids, ids)


@pytest.mark.slow
def test_without_them_the_tokenizers_are_taken(tmp_path):
    hf, mcore = converted_qwen2()  # the unchanged model, converted once for this and the damaged-checkpoint test
    config = json.loads((hf / "config.json").read_text())
    assert not any(config.get(k) is not None for k in SPECIAL)
    ids = {"eos_token_id": 2, "pad_token_id": 0}  # the tiny tokenizer's <|im_end|> and <|endoftext|>; no bos
    assert converted(tmp_path, hf, "--tokenizer", REPO / "assets/tiny/tokenizer", mcore=mcore) == (ids, ids)
