"""The unpaired dataset KTO trains on: TRL's unpaired rows (prompt, completion, label) as they are, and paired
rows split as TRL's own `unpair_preference_dataset` splits them (checked against it), written with the same
atomic swap, stats and bad-row handling as pairwise data."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from trl.data_utils import unpair_preference_dataset  # the test extra has trl: a missing one fails

from dpoc.contract.errors import DpocError
from dpoc.data.pairwise import open_pairwise, output_files
from tests.data.conftest import output_names, write_jsonl
from tests.data.test_preprocess_roundtrip import CHATML_PROMPT_2

UNPAIRED_ROWS = [
    {"prompt": "Name the capital of France.", "completion": "Paris.", "label": True},
    {"prompt": "Name the capital of France.", "completion": "Rome, I think.", "label": False},
    {"prompt": [{"role": "user", "content": "Say hello."}], "completion": [{"role": "assistant", "content": "No."}],
     "label": False},
]
NO_KEYS: dict = {}


def _examples(prefix: str, tokenizer) -> list[tuple[str, str, bool]]:
    """(prompt text, completion text, desirable) of every example, decoded from the files."""
    data = open_pairwise(prefix, unpaired=True)
    out = []
    for i in range(len(data)):
        ids, labels, desirable = (data[i][f] for f in ("completion_input_ids", "completion_labels", "desirable"))
        n = int((labels == -100).sum())
        assert (labels[:n] == -100).all() and (labels[n:] == ids[n:]).all()
        assert desirable.tolist() in ([0], [1])
        out.append((tokenizer.decode(ids[:n].tolist()), tokenizer.decode(ids[n:].tolist()), bool(desirable[0])))
    return out


def test_unpaired_rows_are_written_as_they_are(tmp_path, run, tokenizer):
    rows = write_jsonl(tmp_path / "kto.jsonl", UNPAIRED_ROWS)
    stats, prefix = run(rows, map_keys=NO_KEYS, unpaired=True)
    assert output_names(prefix) == sorted(p.rsplit("/", 1)[1] for p in output_files(prefix, unpaired=True))
    hello = "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
    assert _examples(prefix, tokenizer) == [(CHATML_PROMPT_2, "Paris.<|im_end|>", True),
                                            (CHATML_PROMPT_2, "Rome, I think.<|im_end|>", False),
                                            (hello, "No.<|im_end|>", False)]
    recorded = json.loads(Path(prefix + "_stats.json").read_text())
    assert (recorded["rows_in"], recorded["examples_kept"], recorded["desirable"], recorded["undesirable"]) == \
        (3, 3, 1, 2)
    assert recorded["read_as"] == {"layout": "unpaired", "map_keys": {"prompt": "prompt"}}
    assert recorded["settings"]["unpaired"] is True and "pairs_kept" not in recorded
    data = open_pairwise(prefix, unpaired=True)
    lengths = [len(data[i]["completion_input_ids"]) for i in range(3)]
    assert recorded["tokens"]["total"] == sum(lengths) and recorded["longest"] == {"completion": max(lengths)}
    assert sum(recorded["pair_histogram"]["longer"]) == sum(recorded["pair_histogram"]["tokens"]) == 3
    assert stats.kept == 3


def test_pairs_are_split_as_trl_splits_them(tmp_path, run, tokenizer):
    """1003 pairs: TRL maps them in batches of 1000, each batch's chosen completions first, then its rejected."""
    pairs = [{"prompt": f"Say {i}.", "chosen": f"{i} yes", "rejected": f"{i} no"} for i in range(1003)]
    _, prefix = run(write_jsonl(tmp_path / "pairs.jsonl", pairs), map_keys=NO_KEYS, unpaired=True, workers=2)
    expected = unpair_preference_dataset(datasets.Dataset.from_list(pairs))
    found = _examples(prefix, tokenizer)
    assert [(f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n", f"{c}<|im_end|>", label)
            for p, c, label in zip(expected["prompt"], expected["completion"], expected["label"], strict=True)] == found
    assert [label for *_, label in found[:2000]] == [True] * 1000 + [False] * 1000


def test_unpaired_rows_need_the_unpaired_dataset(tmp_path, run):
    rows = write_jsonl(tmp_path / "kto.jsonl", UNPAIRED_ROWS)
    with pytest.raises(DpocError) as exc:
        run(rows, map_keys=NO_KEYS)
    assert str(exc.value) == ("test.yaml: layout: unpaired rows (a completion and a label) make only the unpaired "
                              "dataset KTO trains on (valid: unpaired: true, or paired data)")
    assert output_names(str(tmp_path / "out" / "dpo")) == []


def test_a_label_that_is_not_a_boolean_is_a_bad_row(tmp_path, run):
    rows = write_jsonl(tmp_path / "kto.jsonl", [UNPAIRED_ROWS[0], {**UNPAIRED_ROWS[1], "label": "yes"}])
    with pytest.raises(DpocError) as exc:
        run(rows, map_keys=NO_KEYS, unpaired=True)
    assert str(exc.value) == (f'{rows}: line 2: column "label" (the default for map_keys.label) must be true or '
                              "false (got str) (--skip-bad-lines skips and counts such rows)")
    stats, prefix = run(rows, map_keys=NO_KEYS, unpaired=True, skip_bad_lines=True)
    assert (stats.kept, stats.dropped["bad_rows"]) == (1, 1)
    assert np.asarray(open_pairwise(prefix, unpaired=True)[0]["desirable"]).tolist() == [1]


def test_show_prints_an_unpaired_example(tmp_path, tokenizer_dir, dpoc_cli):
    rows = write_jsonl(tmp_path / "kto.jsonl", UNPAIRED_ROWS)
    result = dpoc_cli("preprocess", "--input", rows, "--tokenizer", tokenizer_dir, "--output-prefix",
                      tmp_path / "out" / "kto", "--seq-length", "64", "--template", "chatml", "--unpaired",
                      "--show", "2")
    assert result.code == 0, result.err
    assert "line 2: prompt 18 tokens (labels -100), completion +10, undesirable\n" in result.out
    assert "undesirable\n" + CHATML_PROMPT_2 + "▶Rome, I think.<|im_end|>◀\n" in result.out
    assert not (tmp_path / "out").exists()


def test_the_planner_reads_the_unpaired_stats(tmp_path, run):
    """Each example is planned as a pair: its completion and its KL sequence, both at the example's length."""
    from dpoc.planner.lengths import parse_stats

    _, prefix = run(write_jsonl(tmp_path / "kto.jsonl", UNPAIRED_ROWS), map_keys=NO_KEYS, unpaired=True)
    recorded = json.loads(Path(prefix + "_stats.json").read_text())
    lengths = parse_stats(recorded, "kto_stats.json")
    assert lengths.pairs == 3 and lengths.longest == recorded["longest"]["completion"]
