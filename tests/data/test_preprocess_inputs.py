"""Input formats, bad rows, the length policy: what gets written, dropped, counted or refused."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpoc.contract.errors import DpocError
from dpoc.data import readers
from dpoc.data.pairwise import FIELDS, open_pairwise, output_files
from tests.data.conftest import ORCA_ROWS, output_names, write_jsonl


def _contents(prefix: str) -> list[bytes]:
    return [Path(p).read_bytes() for p in output_files(prefix)]


def test_json_array_and_parquet_match_jsonl(tmp_path, run, orca_file, monkeypatch):
    _, expected = run(orca_file, output_prefix=str(tmp_path / "a"))
    array = tmp_path / "orca.json"
    array.write_text(json.dumps(ORCA_ROWS, indent=1))
    monkeypatch.setattr(readers, "_READ_BLOCK", 7)  # elements straddle many read blocks
    _, from_array = run(array, output_prefix=str(tmp_path / "b" / "p"))
    parquet = tmp_path / "orca.parquet"
    pq.write_table(pa.Table.from_pylist(ORCA_ROWS), parquet)
    _, from_parquet = run(parquet, output_prefix=str(tmp_path / "c" / "p"))
    assert _contents(from_array)[:-1] == _contents(expected)[:-1]  # stats differ only in "input"
    assert _contents(from_parquet)[:-1] == _contents(expected)[:-1]


def test_malformed_json_array_names_the_line(tmp_path, run):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"question": "Q", "chosen": "a", "rejected": "b"},\n {"question": oops}\n]')
    with pytest.raises(DpocError) as exc:
        run(bad)
    assert str(exc.value) == (f"{bad}: line 3: not a valid JSON array: Expecting value (JSON arrays cannot "
                              "skip bad elements; JSON Lines can, with --skip-bad-lines)")


def test_malformed_line_names_file_and_line(tmp_path, run):
    path = tmp_path / "orca.jsonl"
    write_jsonl(path, ORCA_ROWS)
    with path.open("a") as f:
        f.write('{"question": "Q", "chosen": "a"\n')
    with pytest.raises(DpocError) as exc:
        run(path)
    assert str(exc.value) == (f"{path}: line 4: not valid JSON (Expecting ',' delimiter at column 32) "
                              "(--skip-bad-lines skips and counts such rows)")


def test_missing_column_is_an_error_naming_row_column_and_map_keys(tmp_path, run):
    path = write_jsonl(tmp_path / "x.jsonl", [{"q": "Q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DpocError, match=r'x.jsonl: line 1: column "question" \(map_keys.prompt\) not found'):
        run(path)


def test_skip_bad_lines_counts_them(tmp_path, run):
    rows = [json.dumps(r) for r in ORCA_ROWS]
    path = tmp_path / "orca.jsonl"
    path.write_text("\n".join([rows[0], "{not json", rows[1], '{"question": "Q"}', "", rows[2]]) + "\n")
    stats, prefix = run(path, skip_bad_lines=True)
    saved = json.loads(Path(prefix + "_stats.json").read_text())
    assert (stats.pairs_in, stats.pairs_kept, saved["dropped"]["bad_rows"]) == (5, 3, 2)
    assert [e.split(":")[0] for e in saved["bad_row_examples"]] == ["line 2", "line 4"]


def test_empty_result_is_an_error_and_writes_nothing(tmp_path, run):
    path = write_jsonl(tmp_path / "e.jsonl", [{"question": "", "system": "", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DpocError) as exc:
        run(path)
    assert str(exc.value) == (f"{path}: (file): no pairs left to write (1 rows read (layout pairwise, detected), 0 kept, 0 dropped for "
                              "length >= seq_length 256, 1 with an empty prompt or response, 0 bad rows "
                              "skipped, 0 truncated)")
    assert output_names(str(tmp_path / "out" / "dpo")) == []


def _lengths(prefix):
    data = open_pairwise(prefix)
    return [{f: len(data[i][f]) for f in FIELDS} | {"prompt": int((data[i]["chosen_labels"] == -100).sum())}
            for i in range(len(data))]


def test_length_filter_drops_pairs_reaching_seq_length(tmp_path, run, orca_file):
    _, full = run(orca_file, output_prefix=str(tmp_path / "full" / "p"))
    lengths = _lengths(full)
    # the seq_length that exactly drops pair 0 (its longest sequence reaches it) and keeps the others
    longest0 = max(lengths[0]["chosen_input_ids"], lengths[0]["rejected_input_ids"])
    assert all(max(x["chosen_input_ids"], x["rejected_input_ids"]) < longest0 for x in lengths[1:])
    stats, prefix = run(orca_file, seq_length=longest0)
    assert stats.dropped["too_long"] == 1 and stats.pairs_kept == 2
    assert _lengths(prefix) == lengths[1:]
    stats, prefix = run(orca_file, seq_length=longest0 + 1)
    assert stats.dropped["too_long"] == 0


def test_truncation_keeps_prompt_end_or_response_start(tmp_path, run, orca_file, tokenizer):
    _, full = run(orca_file, output_prefix=str(tmp_path / "full" / "p"))
    whole = open_pairwise(full)[0]
    n = int((whole["chosen_labels"] == -100).sum())
    chosen_len, rejected_len = len(whole["chosen_input_ids"]) - n, len(whole["rejected_input_ids"]) - n
    limit = n + max(chosen_len, rejected_len) - 3  # 4 tokens too long for seq_length = limit
    stats, prefix = run(orca_file, seq_length=limit, truncate="prompt", output_prefix=str(tmp_path / "a"))
    cut = open_pairwise(prefix)[0]
    keep = n - 4
    assert stats.truncated == 1
    assert (cut["chosen_input_ids"] == whole["chosen_input_ids"][4:]).all()
    assert (cut["rejected_input_ids"] == whole["rejected_input_ids"][4:]).all()
    assert (cut["chosen_labels"][:keep] == -100).all() and (cut["chosen_labels"][keep:] != -100).all()
    stats, prefix = run(orca_file, seq_length=limit, truncate="response", output_prefix=str(tmp_path / "b"))
    cut = open_pairwise(prefix)[0]
    budget = limit - 1 - n
    assert (cut["chosen_input_ids"] == whole["chosen_input_ids"][: n + min(budget, chosen_len)]).all()
    assert (cut["rejected_input_ids"] == whole["rejected_input_ids"][: n + min(budget, rejected_len)]).all()
    assert max(len(cut["chosen_input_ids"]), len(cut["rejected_input_ids"])) == limit - 1


def test_output_directory_that_cannot_be_made_is_an_error(tmp_path, run, orca_file):
    (tmp_path / "file").write_text("")
    with pytest.raises(DpocError) as exc:
        run(orca_file, output_prefix=str(tmp_path / "file" / "dpo"))
    assert str(exc.value) == (f"test.yaml: output_prefix: cannot create the directory {tmp_path / 'file'} "
                              "(File exists)")


@pytest.mark.parametrize("block", [1, 2, 5, 13, 1 << 20])
def test_json_array_reader_matches_json_load_at_any_block_size(tmp_path, monkeypatch, block):
    elements = [{"q": "a ] tricky, string", "n": 12345, "nested": [1, [2, {"x": "}"}]]},
                {"q": 'line\nbreak " \\ \u00e9\u4e2d', "n": -0.5e-3}, {}, {"t": True, "f": None}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(elements, ensure_ascii=False, indent=2), encoding="utf-8")
    monkeypatch.setattr(readers, "_READ_BLOCK", block)
    chunks = list(readers.read_chunks(readers.Source(str(path), "json", path.stat().st_size, "B"), 3))
    assert [row.data for chunk in chunks for row in chunk.rows] == elements
    assert [row.where for row in chunks[0].rows] == ["element 1 (line 2)", "element 2 (line 15)",
                                                     "element 3 (line 19)"]
    assert chunks[-1].position == path.stat().st_size - 1  # everything up to the closing bracket
