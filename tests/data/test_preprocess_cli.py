"""The command as a user runs it: `dpoc preprocess` (`python -m dpoc preprocess`), exit 2 and plain lines on bad
input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data.conftest import REPO, write_jsonl

CONFIG = """\
input: ./data/orca.jsonl
tokenizer: {tokenizer}
template: chatml
map_keys: {{prompt: question, query: "", system: system}}
seq_length: 128
output_prefix: ./dataset/dpo
"""


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "dpoc", "preprocess", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_config_with_relative_paths_runs_from_the_job_dir(tmp_path, tokenizer_dir):
    from tests.data.conftest import ORCA_ROWS

    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "orca.jsonl", ORCA_ROWS)
    (tmp_path / "pre.yaml").write_text(CONFIG.format(tokenizer=tokenizer_dir))
    done = _run(tmp_path, "pre.yaml")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("./dataset/dpo: 3 rows read (layout pairwise, detected), 3 kept, 0 dropped for length "
                                  ">= seq_length")
    assert (tmp_path / "dataset" / "dpo_packed_rejected_labels_document.idx").is_file()
    assert "pairs/s" in done.stderr and "done in" in done.stderr

    shown = _run(tmp_path, "pre.yaml", "--show", "1", "--template", "qwen")
    assert shown.returncode == 0, shown.stderr
    assert ("[chosen]\n<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "What is 2 + 3?<|im_end|>\n<|im_start|>assistant\n▶2 + 3 = 5.<|im_end|>◀\n") in shown.stdout


def test_bad_config_exits_2_with_one_line_per_problem(tmp_path):
    (tmp_path / "pre.yaml").write_text("input: x.jsonl\ntemplate: qwen4\nseq_lenght: 10\nworkers: 0\n")
    done = _run(tmp_path, "pre.yaml")
    assert done.returncode == 2
    assert sorted(done.stderr.splitlines()) == [
        "pre.yaml: output_prefix: is required",
        "pre.yaml: seq_lenght: unknown key (did you mean 'seq_length'? valid: enable_thinking, format, input, "
        "layout, map_keys, output_prefix, seq_length, skip_bad_lines, template, tokenizer, truncate, unpaired, workers)",
        "pre.yaml: seq_length: is required",
        "pre.yaml: template: must be one of 'tokenizer', 'qwen3', 'qwen', 'chatml', 'llama3', 'default' (got 'qwen4')",
        "pre.yaml: tokenizer: is required",
        "pre.yaml: workers: must be >= 1 (got 0)",
    ]


def test_missing_input_exits_2_without_traceback(tmp_path, tokenizer_dir):
    done = _run(tmp_path, "--input", "nope.jsonl", "--tokenizer", str(tokenizer_dir), "--output-prefix", "o",
                "--seq-length", "64")
    assert done.returncode == 2
    assert done.stderr == ("command line: input: nope.jsonl does not exist (relative paths are taken from "
                           f"the current directory, {tmp_path})\n")


def test_importing_the_cli_and_dataset_names_stays_light():
    heavy = "{'torch', 'transformers', 'megatron', 'numpy'}"
    code = (f"import sys, dpoc.cli.preprocess, dpoc.data.pairwise; "
            f"print(sorted({heavy} & {{m.split('.')[0] for m in sys.modules}}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout == "[]\n"


def test_the_readmes_hh_rlhf_and_messages_commands(tmp_path, tokenizer_dir, dpoc_cli, monkeypatch):
    from tests.data.test_preprocess_layouts import HH_ROWS

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "hh_rlhf.jsonl", HH_ROWS)
    user = {"role": "user", "content": "Say hello."}
    write_jsonl(tmp_path / "chat.jsonl", [{"chosen": [user, {"role": "assistant", "content": "Hello!"}],
                                           "rejected": [user, {"role": "assistant", "content": "No."}]}])
    common = ["--tokenizer", str(tokenizer_dir), "--seq-length", "4096"]
    done = dpoc_cli("preprocess", "--input", "hh_rlhf.jsonl", *common, "--template", "qwen3",
                    "--output-prefix", "./dataset/hh")
    assert done.code == 0, done.err
    assert done.out.startswith("./dataset/hh: 2 rows read (layout hh-rlhf, detected), 2 kept")
    done = dpoc_cli("preprocess", "--input", "chat.jsonl", *common, "--layout", "messages",
                    "--output-prefix", "./dataset/chat", "--show", "2")
    assert done.code == 0, done.err
    assert ("[chosen]\n<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n▶Hello!<|im_end|>\n◀\n"
            in done.out)
    written = [p.name for p in (tmp_path / "dataset").iterdir()]
    assert written and not [name for name in written if name.startswith("chat")]  # --show writes nothing
