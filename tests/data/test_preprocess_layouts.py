"""The layouts people's preference data comes in, detected from the first rows (`layout: auto`) and each
preprocessed end to end through the chat template; errors name the layout that would fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpoc.contract.errors import DpocError
from dpoc.data.fields import BadRow, fitting_layout, to_conversation, transcript_messages
from dpoc.data.pairwise import FIELDS, open_pairwise
from tests.data.conftest import ORCA_ROWS, write_jsonl

NO_KEYS: dict = {}
CHATML = "<|im_start|>{role}\n{content}<|im_end|>\n"
REPLY = "<|im_start|>assistant\n"
HH_ROWS = [
    {"chosen": "\n\nHuman: What is 2 + 3?\n\nAssistant: 5.\n\nHuman: And 2 + 4?\n\nAssistant: 6.",
     "rejected": "\n\nHuman: What is 2 + 3?\n\nAssistant: 5.\n\nHuman: And 2 + 4?\n\nAssistant: 7."},
    {"chosen": "\n\nHuman: Say hello.\n\nAssistant: Hello!", "rejected": "\n\nHuman: Say hello.\n\nAssistant: No."},
]


def _turns(*pairs: tuple[str, str]) -> str:
    return "".join(CHATML.format(role=role, content=content) for role, content in pairs)


def _decoded(prefix: str, tokenizer) -> list[tuple[str, str, str]]:
    """(prompt, chosen response, rejected response) of every pair, decoded from the token ids written."""
    out = []
    data = open_pairwise(prefix)
    for i in range(len(data)):
        pair = data[i]
        n = int((pair["chosen_labels"] == -100).sum())
        assert int((pair["rejected_labels"] == -100).sum()) == n
        ids = {side: pair[f"{side}_input_ids"].tolist() for side in ("chosen", "rejected")}
        assert ids["chosen"][:n] == ids["rejected"][:n]
        out.append((tokenizer.decode(ids["chosen"][:n]), tokenizer.decode(ids["chosen"][n:]),
                    tokenizer.decode(ids["rejected"][n:])))
    return out


def _read_as(prefix: str) -> dict:
    return json.loads(Path(prefix + "_stats.json").read_text())["read_as"]


def test_the_chosen_columns_shape_decides_the_layout():
    assert fitting_layout({"chosen": "Paris.", "rejected": "Rome."}, NO_KEYS) == "pairwise"
    assert fitting_layout({"chosen": [{"role": "assistant", "content": "a"}]}, NO_KEYS) == "messages"
    assert fitting_layout(HH_ROWS[0], NO_KEYS) == "hh-rlhf"
    assert fitting_layout({"good": HH_ROWS[0]["chosen"]}, {"chosen": "good"}) == "hh-rlhf"
    assert fitting_layout({"question": "Q", "answer": "A"}, NO_KEYS) is None
    # a reply that merely mentions the word is not a transcript
    assert fitting_layout({"chosen": "Human: a species. Assistant: a helper."}, NO_KEYS) == "pairwise"


def test_hh_transcripts_become_the_shared_turns_and_the_final_replies():
    conversation = to_conversation(HH_ROWS[0], NO_KEYS, "hh-rlhf")
    assert conversation.prompt == [{"role": "user", "content": "What is 2 + 3?"},
                                   {"role": "assistant", "content": "5."},
                                   {"role": "user", "content": "And 2 + 4?"}]
    assert (conversation.chosen, conversation.rejected) == ("6.", "7.")
    assert to_conversation({"chosen": "\n\nHuman: Q\n\nAssistant:", "rejected": "\n\nHuman: Q\n\nAssistant: b"},
                           NO_KEYS, "hh-rlhf") is None  # an empty reply is dropped and counted
    with pytest.raises(BadRow, match=r"differ before their final assistant turn"):
        to_conversation({"chosen": "\n\nHuman: A\n\nAssistant: a", "rejected": "\n\nHuman: B\n\nAssistant: b"},
                        NO_KEYS, "hh-rlhf")
    with pytest.raises(BadRow, match=r'^column "c" \(map_keys.chosen\) does not start with "Human:"'):
        transcript_messages("Note.\n\nHuman: Q\n\nAssistant: a", 'column "c" (map_keys.chosen)')


def test_hh_rlhf_file_is_detected_and_preprocessed_multi_turn(tmp_path, run, tokenizer):
    _, prefix = run(write_jsonl(tmp_path / "hh.jsonl", HH_ROWS), map_keys={})
    assert _read_as(prefix) == {"layout": "hh-rlhf", "map_keys": {}}
    assert _decoded(prefix, tokenizer) == [
        (_turns(("user", "What is 2 + 3?"), ("assistant", "5."), ("user", "And 2 + 4?")) + REPLY,
         "6.<|im_end|>", "7.<|im_end|>"),
        (_turns(("user", "Say hello.")) + REPLY, "Hello!<|im_end|>", "No.<|im_end|>"),
    ]


def test_messages_file_is_detected_with_full_conversations_or_a_prompt_list(tmp_path, run, tokenizer):
    user = {"role": "user", "content": "Name the capital of France."}
    system = {"role": "system", "content": "Be brief."}
    rows = [  # full conversations (UltraFeedback style), then TRL's conversational format (prompt as messages)
        {"chosen": [system, user, {"role": "assistant", "content": "Paris."}],
         "rejected": [system, user, {"role": "assistant", "content": "Rome."}]},
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "Paris!"}],
         "rejected": [{"role": "assistant", "content": "Lyon."}]},
    ]
    _, prefix = run(write_jsonl(tmp_path / "chat.jsonl", rows), map_keys={})
    # the first row has no prompt column; the inferred one is read only where chosen holds just the reply
    assert _read_as(prefix) == {"layout": "messages", "map_keys": {}}
    france = _turns(("user", "Name the capital of France.")) + REPLY
    assert _decoded(prefix, tokenizer)[0] == (_turns(("system", "Be brief.")) + france, "Paris.<|im_end|>",
                                              "Rome.<|im_end|>")
    _, prefix = run(write_jsonl(tmp_path / "trl.jsonl", rows[1:]), map_keys={}, output_prefix=str(tmp_path / "t"))
    assert _read_as(prefix) == {"layout": "messages", "map_keys": {"prompt": "prompt"}}
    assert _decoded(prefix, tokenizer) == [(france, "Paris!<|im_end|>", "Lyon.<|im_end|>")]


def test_orca_columns_are_detected_and_give_the_bytes_of_the_explicit_mapping(tmp_path, run, orca_file):
    _, explicit = run(orca_file, layout="pairwise", output_prefix=str(tmp_path / "a" / "p"))
    _, detected = run(orca_file, map_keys={}, output_prefix=str(tmp_path / "b" / "p"))
    assert _read_as(detected) == {"layout": "pairwise", "map_keys": {"prompt": "question", "system": "system"}}
    for field in FIELDS:
        for ext in (".bin", ".idx"):
            name = f"_packed_{field}_document{ext}"
            assert Path(detected + name).read_bytes() == Path(explicit + name).read_bytes()


def test_a_missing_column_names_the_layout_that_fits(tmp_path, run):
    """The first thing a new user hit: a messages file read with orca's columns."""
    user = {"role": "user", "content": "Q"}
    rows = [{"chosen": [user, {"role": "assistant", "content": "a"}],
             "rejected": [user, {"role": "assistant", "content": "b"}]}]
    path = write_jsonl(tmp_path / "orca_chat.jsonl", rows)
    with pytest.raises(DpocError) as exc:
        run(path, layout="pairwise")
    assert str(exc.value) == (
        f'{path}: line 1: column "question" (map_keys.prompt) not found (columns: chosen, rejected; map a column '
        'with map_keys.prompt, or disable it with map_keys.prompt: ""; the row looks like layout: messages '
        "(chosen/rejected are chat message lists)) (--skip-bad-lines skips and counts such rows)")
    # auto reads the same file, whatever its name says and whatever map_keys guessed for the prompt
    _, prefix = run(path)
    assert _read_as(prefix)["layout"] == "messages"
    hh = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    with pytest.raises(DpocError, match=r"must be a list \(got str; the row looks like layout: hh-rlhf \(chosen/"):
        run(hh, layout="messages")


def test_detection_refuses_mixed_or_unrecognisable_rows(tmp_path, run):
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [ORCA_ROWS[0], HH_ROWS[0], HH_ROWS[1]])
    with pytest.raises(DpocError) as exc:
        run(mixed)
    assert str(exc.value) == (f"test.yaml: layout: auto: the first rows of {mixed} mix layouts (line 1: pairwise, "
                              "line 2: hh-rlhf); valid: set layout: pairwise | messages | hh-rlhf | unpaired")
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [], "id": 1}])
    with pytest.raises(DpocError) as exc:
        run(sft)
    assert str(exc.value).startswith(
        f'test.yaml: layout: auto: cannot tell the layout of {sft}: its rows have no column "chosen" holding the '
        "chosen response (line 1: id, messages); valid: map_keys.chosen and map_keys.rejected naming the response "
        "columns, or layout: pairwise (prompt/chosen/rejected text columns); messages (")


def test_a_built_recipe_leaves_the_layout_to_the_data_whatever_the_file_is_called(tmp_path, tokenizer_dir,
                                                                                  dpoc_cli, monkeypatch):
    """resolve is pure: an `orca` in the path no longer guesses columns; preprocessing reads the rows."""
    from dpoc.compiler.pipeline import build

    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "chat.yaml"
    recipe.write_text(f"model: {{preset: tiny-qwen3, tokenizer: {tokenizer_dir}}}\nhardware: {{preset: cpu}}\n"
                      "dataset: {path: ./data/orca_chat.jsonl, template: chatml, output_prefix: ./data/chat}\n"
                      "training: {seq_length: 64, global_batch_size: 2, train_iters: 1, lr: 1.0e-3}\n"
                      "checkpoint: {init: random}\n")
    plan, out = build(recipe, out=tmp_path / "build")
    assert (plan.data.layout, plan.data.map_keys) == ("auto", ())
    user = {"role": "user", "content": "Q"}
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "orca_chat.jsonl", [{"chosen": [user, {"role": "assistant", "content": "a"}],
                                                         "rejected": [user, {"role": "assistant", "content": "b"}]}])
    done = dpoc_cli("preprocess", out / "preprocess.yaml")
    assert done.code == 0, done.err
    assert _read_as("./data/chat") == {"layout": "messages", "map_keys": {}}
