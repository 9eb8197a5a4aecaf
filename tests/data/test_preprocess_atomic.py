"""Outputs appear whole or not at all, and any worker count writes the same bytes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dpoc.contract.errors import DpocError
from dpoc.data import pairwise
from dpoc.data.pairwise import output_files
from tests.data.conftest import ORCA_ROWS, output_names, write_jsonl

ROWS = 700  # several 256-row chunks


def _many_rows(tmp_path: Path, bad_line: int | None = None) -> Path:
    rows = [dict(ORCA_ROWS[i % 3], question=f"{ORCA_ROWS[i % 3]['question']} #{i}") for i in range(ROWS)]
    rows[5]["chosen"] = ""  # one dropped pair, so drops are ordered too
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    if bad_line is not None:
        lines = path.read_text().splitlines(keepends=True)
        lines[bad_line - 1] = "{broken\n"
        path.write_text("".join(lines))
    return path


def _snapshot(prefix: str) -> dict[str, bytes]:
    return {p: Path(p).read_bytes() for p in output_files(prefix)}


def test_failure_midway_leaves_existing_output_untouched_and_no_temp_files(tmp_path, run, orca_file):
    _, prefix = run(orca_file)
    before = _snapshot(prefix)
    with pytest.raises(DpocError, match="line 650: not valid JSON"):
        run(_many_rows(tmp_path, bad_line=650))
    assert _snapshot(prefix) == before
    assert output_names(prefix) == sorted(os.path.basename(p) for p in output_files(prefix))


def test_failure_midway_on_a_fresh_prefix_writes_nothing(tmp_path, run):
    with pytest.raises(DpocError):
        run(_many_rows(tmp_path, bad_line=650))
    assert output_names(str(tmp_path / "out" / "dpo")) == []


def test_failed_swap_restores_the_previous_output(tmp_path, run, orca_file, monkeypatch):
    _, prefix = run(orca_file)
    before = _snapshot(prefix)
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == len(before) + 3:  # after moving the old set aside, while placing the new one
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(pairwise.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk full"):
        run(_many_rows(tmp_path))
    monkeypatch.undo()
    assert _snapshot(prefix) == before
    assert output_names(prefix) == sorted(os.path.basename(p) for p in output_files(prefix))


def test_two_workers_write_the_same_bytes_as_one(tmp_path, run):
    path = _many_rows(tmp_path)
    stats, one = run(path, output_prefix=str(tmp_path / "w1" / "p"))
    _, two = run(path, output_prefix=str(tmp_path / "w2" / "p"), workers=2)
    assert stats.pairs_kept == ROWS - 1 and stats.dropped["empty"] == 1
    assert list(_snapshot(one).values()) == list(_snapshot(two).values())
    assert json.loads(Path(two + "_stats.json").read_text())["pairs_kept"] == ROWS - 1


def test_a_template_error_in_a_worker_reaches_the_user(tmp_path, run, orca_file, tokenizer_dir):
    import shutil

    odd = tmp_path / "odd-tokenizer"
    shutil.copytree(tokenizer_dir, odd)
    # renders the generation prompt, but not the same header once the reply is there
    (odd / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(DpocError) as exc:
        run(orca_file, tokenizer=str(odd), template="tokenizer", workers=2)
    assert str(exc.value) == (
        "test.yaml: template: the tokenizer's chat template renders the prompt differently inside the full "
        "conversation, so the response cannot be separated from it (use a named template: qwen3, qwen, "
        "chatml, llama3, default)")
    assert output_names(str(tmp_path / "out" / "dpo")) == []
