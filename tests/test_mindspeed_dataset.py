"""A pairwise dataset as MindSpeed-LLM's AlpacaStylePairwiseHandler writes it trains as it is.

Its files: megatron-core's IndexedDatasetBuilder at its default int32, one per key of
`{prefix}_packed_{chosen,rejected}_{input_ids,labels}_document.{bin,idx}`; prompt and response tokenized
apart, the labels the input ids with -100 over the prompt (the loss shifts them); a sample it drops for
length still ends a document, so empty documents appear; no dpoc `_stats.json`. The runtime must read it as
dpoc's own dataset of the same rows, cut over-long pairs as MindSpeed-LLM does, and train from a build's
node script, whose preflight accepts it with one warning.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from dpoc.common.ports import free_port
from dpoc.compiler.pipeline import build
from dpoc.data.config import build_config
from dpoc.data.pairwise import FIELDS
from dpoc.data.pipeline import preprocess
from dpoc.runtime.step.data import PairwiseDataset, fit_pair, kept_lengths
from tests.conftest import NO_DEVICE_CHECK, RECIPES, REPO, script_env

TOKENIZER = REPO / "assets" / "tiny" / "tokenizer"
ROWS = [json.loads(line) for line in (REPO / "assets" / "tiny" / "orca_tiny.jsonl").read_text().splitlines()[:8]]


def _chatml(row: dict) -> tuple[str, str, str]:
    """MindSpeed-LLM's qwen-style rendering of an orca row, done here by hand: prompt, chosen, rejected text."""
    system = f"<|im_start|>system\n{row['system']}<|im_end|>\n" if row["system"] else ""
    prompt = f"{system}<|im_start|>user\n{row['question']}<|im_end|>\n<|im_start|>assistant\n"
    return prompt, row["chosen"] + "<|im_end|>", row["rejected"] + "<|im_end|>"


def write_like_mindspeed(prefix: str, rows: list[dict], dropped: set[int]) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    builders = {key: IndexedDatasetBuilder(f"{prefix}_packed_{key}_document.bin") for key in FIELDS}
    for i, row in enumerate(rows):
        prompt, chosen, rejected = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in _chatml(row))
        values = {"chosen_input_ids": prompt + chosen, "chosen_labels": [-100] * len(prompt) + chosen,
                  "rejected_input_ids": prompt + rejected, "rejected_labels": [-100] * len(prompt) + rejected}
        for key, builder in builders.items():
            if i not in dropped:  # a dropped sample adds no sequence but still ends its document
                builder.add_item(torch.IntTensor(values[key]))
            builder.end_document()
    for key, builder in builders.items():
        builder.finalize(f"{prefix}_packed_{key}_document.idx")
    return prefix


@pytest.fixture(scope="module")
def mindspeed_prefix(tmp_path_factory) -> str:
    return write_like_mindspeed(str(tmp_path_factory.mktemp("ms") / "orca"), ROWS, dropped={3})


def test_read_as_dpocs_own_dataset_of_the_same_rows(mindspeed_prefix, tmp_path):
    kept = [row for i, row in enumerate(ROWS) if i != 3]
    source = tmp_path / "kept.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in kept))
    ours = str(tmp_path / "dpoc")
    preprocess(build_config({"input": str(source), "tokenizer": str(TOKENIZER), "output_prefix": ours,
                             "seq_length": 256, "template": "chatml"}, "test.yaml"))
    theirs, mine = PairwiseDataset(mindspeed_prefix, 256), PairwiseDataset(ours, 256, tokenizer=str(TOKENIZER))
    assert len(theirs) == len(mine) == 7
    for i in range(7):
        assert all(np.array_equal(a, b) for a, b in zip(theirs[i], mine[i], strict=True)), i
    assert theirs.pair_lengths.tolist() == mine.pair_lengths.tolist()
    assert mine.warnings == []
    assert theirs.warnings == [f"{mindspeed_prefix}: no orca_stats.json (a dataset preprocessed by MindSpeed-LLM?): "
                               "its length statistics are unknown, and its tokenizer, template and seq_length cannot "
                               "be checked against this build"]


def test_over_long_pairs_are_cut_by_mindspeeds_rule(mindspeed_prefix):
    # responses under half the limit: the prompt loses its end; a prompt under half: the responses lose theirs;
    # else both, in proportion to their lengths
    assert kept_lengths(20, 5, 16) == (11, 5)
    assert kept_lengths(4, 30, 16) == (4, 12)
    assert kept_lengths(10, 30, 16) == (4, 12)
    assert kept_lengths(5, 6, 16) == (5, 6)  # fits: unchanged
    prompt, chosen, rejected = np.arange(10), np.arange(100, 130), np.arange(200, 220)
    pair = [np.concatenate([prompt, chosen]), np.concatenate([np.full(10, -100), chosen]),
            np.concatenate([prompt, rejected]), np.concatenate([np.full(10, -100), rejected])]
    cut = fit_pair(pair, 16)
    assert cut[0].tolist() == [*range(4), *range(100, 112)] and cut[2].tolist() == [*range(4), *range(200, 212)]
    assert cut[1].tolist() == [-100] * 4 + list(range(100, 112))
    dataset = PairwiseDataset(mindspeed_prefix, 24)
    longest = int(np.maximum(dataset.data.lengths("chosen_input_ids"), dataset.data.lengths("rejected_input_ids"))
                  .max())
    assert longest > 24 and max(len(a) for i in range(len(dataset)) for a in dataset[i]) == 24
    too_long = int((dataset.pair_lengths == 24).sum())
    assert dataset.warnings[-1].startswith(f"{mindspeed_prefix}: {too_long} of 7 pairs are longer than --seq-length 24;")




@pytest.mark.slow
def test_a_build_trains_on_it_from_its_node_script(mindspeed_prefix, tmp_path):
    out, run_dir = tmp_path / "build", tmp_path / "run"
    build(RECIPES / "tiny_cpu.yaml", ["hardware.devices_per_node=1", "training.train_iters=1", "training.warmup_iters=0",
                                      "training.global_batch_size=2", "parallelism.micro_batch_size=2",
                                      f"dataset.output_prefix={mindspeed_prefix}", f"run_dir={run_dir}"], out=out)
    env = script_env(DPOC_MASTER_PORT=str(free_port()), **NO_DEVICE_CHECK)  # the dataset, not the check, is under test
    done = subprocess.run(["bash", str(out / "nodes/node-0.sh")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    warning = f"{mindspeed_prefix}: no orca_stats.json (a dataset preprocessed by MindSpeed-LLM?)"
    assert [line for line in done.stderr.splitlines() if warning in line] == [f"{out}: warning: {warning}: its "
           "length statistics are unknown, and its tokenizer, template and seq_length cannot be checked against this "
           "build"]
    assert f"warning: {warning}" in (run_dir / "train.log").read_text()
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1] and abs(steps[0]["loss"] - np.log(2)) < 1e-6
