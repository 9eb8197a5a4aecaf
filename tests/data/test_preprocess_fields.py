"""map_keys with MindSpeed-RL semantics, and the messages layout."""

from __future__ import annotations

import pytest

from dpoc.data.fields import BadRow, Conversation, to_conversation

ORCA_KEYS = {"prompt": "question", "query": "", "system": "system"}


def test_prompt_and_query_join_with_a_newline_and_system_leads():
    row = {"instruction": "Translate.", "input": "bonjour", "system": "S", "chosen": "hi", "rejected": "bye"}
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": "Translate.\nbonjour"}]
    assert to_conversation(row, {"system": "system"}, "pairwise") == Conversation(prompt, "hi", "bye")


def test_empty_string_disables_a_field_and_unmapped_input_may_be_absent():
    row = {"question": "Q", "input": "not used", "system": "", "chosen": "a", "rejected": "b"}
    assert to_conversation(row, ORCA_KEYS, "pairwise").prompt == [{"role": "user", "content": "Q"}]
    assert to_conversation({"instruction": "Q", "chosen": "a", "rejected": "b"}, {}, "pairwise").prompt == [
        {"role": "user", "content": "Q"}]


def test_history_pairs_become_earlier_turns():
    row = {"instruction": "And 3+3?", "hist": [["1+1?", "2"]], "chosen": "6", "rejected": "7"}
    assert to_conversation(row, {"history": "hist"}, "pairwise").prompt == [
        {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And 3+3?"}]


def test_missing_mapped_column_names_column_and_map_keys_entry():
    with pytest.raises(BadRow) as exc:
        to_conversation({"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": "question"}, "pairwise")
    assert str(exc.value) == ('column "question" (map_keys.prompt) not found (columns: chosen, prompt, '
                              'rejected; map a column with map_keys.prompt, or disable it with '
                              'map_keys.prompt: "")')


def test_missing_default_column_says_it_is_the_default():
    with pytest.raises(BadRow, match=r'^column "instruction" \(the default for map_keys.prompt\) not found'):
        to_conversation({"question": "Q", "chosen": "a", "rejected": "b"}, {}, "pairwise")


@pytest.mark.parametrize("row", [
    {"instruction": "", "chosen": "a", "rejected": "b"},
    {"instruction": "Q", "chosen": "", "rejected": "b"},
    {"instruction": "Q", "chosen": "a", "rejected": None},
])
def test_empty_prompt_or_response_is_dropped(row):
    assert to_conversation(row, {}, "pairwise") is None


def test_wrong_types_are_bad_rows():
    listed = [{"role": "assistant", "content": "a"}]
    message = (r'column "chosen" \(the default for map_keys.chosen\) must be a string \(got list; the row looks like '
               r'layout: messages \(chosen/rejected are chat message lists\)\)')
    with pytest.raises(BadRow, match=message):
        to_conversation({"instruction": "Q", "chosen": listed, "rejected": "b"}, {}, "pairwise")
    with pytest.raises(BadRow, match=r"must be a string \(got int\)"):
        to_conversation({"instruction": 3, "chosen": "a", "rejected": "b"}, {}, "pairwise")
    with pytest.raises(BadRow, match=r"is not a JSON object \(got list\)"):
        to_conversation([1, 2], {}, "pairwise")


def test_messages_must_share_the_prompt():
    def talk(user, answer):
        return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]

    with pytest.raises(BadRow, match="differ before their final assistant turn"):
        to_conversation({"chosen": talk("Q1", "a"), "rejected": talk("Q2", "b")}, {}, "messages")
    with pytest.raises(BadRow, match="must end with an assistant message"):
        to_conversation({"chosen": talk("Q", "a")[:1], "rejected": talk("Q", "b")}, {}, "messages")
