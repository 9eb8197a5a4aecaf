"""Round trip: written with megatron-core's builder, read back with its IndexedDataset, decoded exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from dpoc.contract.errors import DpocError
from dpoc.data.pairwise import FIELDS, dataset_prefix, open_pairwise, output_files
from tests.data.conftest import output_names, write_jsonl

CHATML_PROMPT_1 = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                   "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
CHATML_PROMPT_2 = "<|im_start|>user\nName the capital of France.<|im_end|>\n<|im_start|>assistant\n"


def _check_pair(sample, tokenizer, prompt, chosen, rejected):
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    for side, response in (("chosen", chosen), ("rejected", rejected)):
        ids, labels = sample[f"{side}_input_ids"], sample[f"{side}_labels"]
        assert ids.dtype == np.int32 and labels.dtype == np.int32
        assert tokenizer.decode(ids.tolist()) == prompt + response
        assert tokenizer.decode(ids[:n].tolist()) == prompt
        assert (labels[:n] == -100).all()
        assert (labels[n:] == ids[n:]).all() and (labels[n:] != -100).all()


def test_orca_style_round_trip_through_megatron_reader(orca_file, run, tokenizer):
    stats, prefix = run(orca_file)
    assert output_names(prefix) == sorted(p.rsplit("/", 1)[1] for p in output_files(prefix))
    datasets = {f: IndexedDataset(dataset_prefix(prefix, f)) for f in FIELDS}
    assert {f: len(d) for f, d in datasets.items()} == dict.fromkeys(FIELDS, 3)
    # one document per pair
    assert all(d.document_indices.tolist() == [0, 1, 2, 3] for d in datasets.values())
    samples = [{f: d[i] for f, d in datasets.items()} for i in range(3)]
    _check_pair(samples[0], tokenizer, CHATML_PROMPT_1, "2 + 3 = 5.<|im_end|>", "2 + 3 = 6.<|im_end|>")
    _check_pair(samples[1], tokenizer, CHATML_PROMPT_2, "Paris.<|im_end|>", "Rome, I think.<|im_end|>")
    pairwise = open_pairwise(prefix)
    assert len(pairwise) == 3
    assert all((pairwise[1][f] == samples[1][f]).all() for f in FIELDS)
    assert pairwise.lengths("rejected_labels").tolist() == [len(s["rejected_labels"]) for s in samples]
    assert stats.pairs_kept == 3


def test_stats_file_counts_tokens_and_lengths(orca_file, run, tokenizer):
    _, prefix = run(orca_file)
    stats = json.loads(Path(prefix + "_stats.json").read_text())
    pairwise = open_pairwise(prefix)
    prompt = sum(int((pairwise[i]["chosen_labels"] == -100).sum()) for i in range(3))
    chosen = sum(len(pairwise[i]["chosen_input_ids"]) for i in range(3))
    rejected = sum(len(pairwise[i]["rejected_input_ids"]) for i in range(3))
    assert stats["pairs_in"] == stats["pairs_kept"] == 3
    assert stats["dropped"] == {"bad_rows": 0, "empty": 0, "too_long": 0}
    assert stats["tokens"] == {"prompt": prompt, "chosen_response": chosen - prompt,
                               "rejected_response": rejected - prompt, "total": chosen + rejected}
    assert sum(stats["length_histogram"]["chosen"]) == 3
    assert stats["length_histogram"]["bin_edges"][:3] == [0, 16, 32]
    assert stats["longest"]["chosen"] == max(len(pairwise[i]["chosen_input_ids"]) for i in range(3))
    # per pair, its longer side and both sides' tokens: what training.length_stats models padding and packing by
    pairs = stats["pair_histogram"]
    sides = [(len(pairwise[i]["chosen_input_ids"]), len(pairwise[i]["rejected_input_ids"])) for i in range(3)]
    width = pairs["longer_bin_edges"][1]
    assert pairs["longer_bin_edges"][-1] == stats["settings"]["seq_length"] and pairs["tokens_bin_edges"][1] == 2 * width
    assert [i for i, c in enumerate(pairs["longer"]) for _ in range(c)] == sorted(max(s) // width for s in sides)
    assert [i for i, c in enumerate(pairs["tokens"]) for _ in range(c)] == sorted(sum(s) // (2 * width) for s in sides)
    # the prompt / response split: each pair's two responses' tokens, in its longer side's bin
    responses = [0] * len(pairs["longer"])
    for i, s in enumerate(sides):
        responses[max(s) // width] += sum(s) - 2 * int((pairwise[i]["chosen_labels"] == -100).sum())
    assert pairs["longer_response_tokens"] == responses and sum(responses) == chosen + rejected - 2 * prompt


def test_tokenizer_chat_template(orca_file, run, tokenizer):
    _, prefix = run(orca_file, template="tokenizer")
    # the tiny tokenizer's template is chatml without a default system; the full conversation adds "\n"
    _check_pair(open_pairwise(prefix)[1], tokenizer, CHATML_PROMPT_2, "Paris.<|im_end|>\n",
                "Rome, I think.<|im_end|>\n")


def test_messages_layout(tmp_path, run, tokenizer):
    user = {"role": "user", "content": "Name the capital of France."}
    rows = [{"prompt": "ignored when the messages hold the prompt",
             "chosen": [user, {"role": "assistant", "content": "Paris."}],
             "rejected": [user, {"role": "assistant", "content": "Rome, I think."}]},
            {"prompt": "Say hello.", "chosen": [{"role": "assistant", "content": "Hello!"}],
             "rejected": [{"role": "assistant", "content": "No."}]}]
    _, prefix = run(write_jsonl(tmp_path / "m.jsonl", rows), layout="messages", map_keys={"prompt": "prompt"})
    pairwise = open_pairwise(prefix)
    _check_pair(pairwise[0], tokenizer, CHATML_PROMPT_2, "Paris.<|im_end|>", "Rome, I think.<|im_end|>")
    _check_pair(pairwise[1], tokenizer, "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n",
                "Hello!<|im_end|>", "No.<|im_end|>")


def test_opening_an_incomplete_dataset_is_an_error(orca_file, run):
    _, prefix = run(orca_file)
    Path(dataset_prefix(prefix, "rejected_labels") + ".idx").unlink()
    with pytest.raises(DpocError) as exc:
        open_pairwise(prefix)
    missing = f"{prefix}_packed_rejected_labels_document.idx"
    assert str(exc.value) == (f"{prefix}: (dataset): incomplete pairwise dataset: missing {missing} "
                              "(run dpoc preprocess to write it)")
