"""From a data row to a conversation, for each layout, with `map_keys` (canonical field → column) as in MindSpeed-RL.

Pairwise layout (Alpaca style): the user turn is `prompt` and `query` joined by a newline (empty parts
skipped), `system` and `history` (a list of [user, assistant] pairs) come before it, `chosen` and
`rejected` are strings. Messages layout: `chosen` and `rejected` are chat message lists that share every
turn but the final assistant one; if they hold only that turn, the prompt comes from the `prompt` column
(a message list, as in TRL's conversational format, or text with the pairwise fields). HH-RLHF layout:
`chosen` and `rejected` are Anthropic transcripts ("\\n\\nHuman: … \\n\\nAssistant: …"), read as message
lists; their shared turns are the prompt. Unpaired layout (TRL's unpaired format, for KTO): a `completion`
(text, or a message list ending with the assistant reply) and a boolean `label` (desirable or not), the prompt
read as in the messages layout. A column mapped to `""` is disabled. Rows with an empty prompt
or response are dropped, as in MindSpeed-RL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# canonical field -> column used when map_keys does not name one (None: not read unless mapped)
DEFAULT_COLUMNS = {"prompt": "instruction", "query": "input", "system": None, "history": None,
                   "chosen": "chosen", "rejected": "rejected", "completion": "completion", "label": "label"}
# unmapped fields whose default column may be absent (MindSpeed-RL fails there; dpoc reads it as empty)
_OPTIONAL_DEFAULTS = {"query"}
# what each layout means, for the hints in error messages
LAYOUTS = {"pairwise": "prompt/chosen/rejected text columns",
           "messages": "chosen/rejected are chat message lists",
           "hh-rlhf": 'chosen/rejected are "\\n\\nHuman: … \\n\\nAssistant: …" transcripts',
           "unpaired": "a completion and a boolean label, for KTO"}
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
_ROLES = {"Human": "user", "Assistant": "assistant"}

Message = dict[str, str]


class BadRow(ValueError):
    """A row that cannot be read as a preference pair; the message says why."""


@dataclass(frozen=True)
class Conversation:
    prompt: list[Message]  # system / earlier turns / the final user turn
    chosen: str
    rejected: str


@dataclass(frozen=True)
class Example:
    """One row of unpaired data: a prompt, a completion, and whether the completion is desirable."""

    prompt: list[Message]
    completion: str
    desirable: bool


def columns_for(map_keys: Mapping[str, str]) -> dict[str, str | None]:
    return {name: map_keys.get(name, default) or None for name, default in DEFAULT_COLUMNS.items()}


def fitting_layout(row: Any, map_keys: Mapping[str, str]) -> str | None:
    """The layout a row's chosen column looks like (None when the row has no such column): a message list is
    `messages`, a Human/Assistant transcript `hh-rlhf`, other text `pairwise`. Only the chosen value's shape
    counts, never the file's name or a guessed prompt column."""
    columns = columns_for(map_keys)
    if not isinstance(row, dict):
        return None
    if columns["chosen"] not in row and columns["completion"] in row and columns["label"] in row:
        return "unpaired"
    value = row.get(columns["chosen"]) if columns["chosen"] else None
    if isinstance(value, list):
        return "messages"
    if isinstance(value, str):
        return "hh-rlhf" if value.lstrip().startswith("Human:") and "\n\nAssistant:" in value else "pairwise"
    return None


def to_conversation(row: Any, map_keys: Mapping[str, str], layout: str) -> Conversation | None:
    """The row's conversation, or None when its prompt or a response is empty (dropped, and counted)."""
    if not isinstance(row, dict):
        raise BadRow(f"is not a JSON object (got {type(row).__name__})")
    get = _Getter(row, map_keys, layout)
    if layout == "pairwise":
        prompt = _pairwise_prompt(get)
        chosen, rejected = get.field("chosen", str), get.field("rejected", str)
    else:
        chosen_prefix, chosen = _split(_turns(get, "chosen"), "chosen", get)
        rejected_prefix, rejected = _split(_turns(get, "rejected"), "rejected", get)
        if chosen_prefix != rejected_prefix:
            raise BadRow(f"{get.name('chosen')} and {get.name('rejected')} differ before their final "
                         "assistant turn (they must share the prompt)")
        if layout == "hh-rlhf" and not chosen_prefix:
            raise BadRow(f"{get.name('chosen')} has no Human turn before its final Assistant turn")
        prompt = chosen_prefix or _messages_prompt(get)
    if not prompt or prompt[-1]["role"] != "user" or not prompt[-1]["content"] or not chosen or not rejected:
        return None
    return Conversation(prompt, chosen, rejected)


def to_example(row: Any, map_keys: Mapping[str, str]) -> Example | None:
    """The unpaired row's example, or None when its prompt or completion is empty (dropped, and counted)."""
    if not isinstance(row, dict):
        raise BadRow(f"is not a JSON object (got {type(row).__name__})")
    get = _Getter(row, map_keys, "unpaired")
    desirable = get.field("label", bool)
    if desirable is None:
        raise BadRow(f"{get.name('label')} must be true or false (got null)")
    prompt = _messages_prompt(get)
    completion = get.raw("completion")
    if isinstance(completion, list):
        earlier, completion = _split(completion, "completion", get)
        prompt += earlier
    else:
        completion = get.field("completion", str)
    if not prompt or prompt[-1]["role"] != "user" or not prompt[-1]["content"] or not completion:
        return None
    return Example(prompt, completion, desirable)


def _turns(get: _Getter, field: str) -> list:
    if get.layout == "messages":
        return get.field(field, list) or []
    return transcript_messages(get.field(field, str) or "", get.name(field))


def transcript_messages(text: str, name: str) -> list[Message]:
    """An HH-RLHF transcript as messages: each "Human:" / "Assistant:" marker (at the start or after a blank
    line) opens a turn; text before the first marker is an error."""
    parts = _TURN.split(text)
    if parts[0].strip():
        raise BadRow(f'{name} does not start with "Human:" (got {parts[0][:40]!r})')
    return [{"role": _ROLES[role], "content": content.strip()} for role, content in
            zip(parts[1::2], parts[2::2], strict=True)]


def _pairwise_prompt(get: _Getter) -> list[Message]:
    messages = []
    user = "\n".join(part for part in (get.field("prompt", str), get.field("query", str)) if part)
    system = get.field("system", str)
    if system:
        messages.append({"role": "system", "content": system})
    for turn in get.field("history", list) or []:
        if not (isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise BadRow(f"{get.name('history')} must be a list of [user, assistant] string pairs "
                         f"(got {turn!r})")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    messages.append({"role": "user", "content": user})
    return messages


def _messages_prompt(get: _Getter) -> list[Message]:
    """The prompt of a messages row whose chosen/rejected hold only the reply: the prompt column as a message
    list (TRL's conversational format, after the system column if mapped), else the pairwise fields."""
    if not isinstance(get.raw("prompt"), list):
        return _pairwise_prompt(get)
    system = get.field("system", str)
    turns = _checked(get.raw("prompt"), "prompt", get)
    return ([{"role": "system", "content": system}] if system else []) + turns


def _checked(messages: list, field: str, get: _Getter) -> list[Message]:
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BadRow(f"{get.name(field)} must be a list of {{role, content}} messages (got {m!r})")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _split(messages: list, field: str, get: _Getter) -> tuple[list[Message], str]:
    messages = _checked(messages, field, get)
    if not messages or messages[-1]["role"] != "assistant":
        raise BadRow(f"{get.name(field)} must end with an assistant message")
    return messages[:-1], messages[-1]["content"]


class _Getter:
    """Reads canonical fields from a row and names the column and its map_keys entry in errors."""

    def __init__(self, row: dict, map_keys: Mapping[str, str], layout: str):
        self.row, self.map_keys, self.layout = row, map_keys, layout
        self.columns = columns_for(map_keys)

    def name(self, field: str) -> str:
        if field in self.map_keys:
            return f'column "{self.columns[field]}" (map_keys.{field})'
        return f'column "{self.columns[field]}" (the default for map_keys.{field})'

    def raw(self, field: str) -> Any:
        column = self.columns[field]
        return self.row.get(column) if column else None

    def field(self, field: str, kind: type) -> Any:
        column = self.columns[field]
        if column is None:
            return None
        if column not in self.row:
            prompt_side = self.layout != "pairwise" and field not in ("chosen", "rejected", "completion", "label")
            if field not in self.map_keys and (field in _OPTIONAL_DEFAULTS or prompt_side):
                return None
            raise BadRow(f"{self.name(field)} not found (columns: {', '.join(sorted(map(str, self.row)))}; "
                         f'map a column with map_keys.{field}, or disable it with map_keys.{field}: ""'
                         f"{self._hint()})")
        value = self.row[column]
        if value is None:
            return None
        if not isinstance(value, kind):
            kinds = {str: "a string", list: "a list", bool: "true or false"}
            hint = self._hint() if field in ("chosen", "rejected", "completion") else ""
            raise BadRow(f"{self.name(field)} must be {kinds[kind]} (got {type(value).__name__}{hint})")
        return value

    def _hint(self) -> str:
        """`; the row looks like layout: X (...)` when another layout fits the row: the fix most users need."""
        fit = fitting_layout(self.row, self.map_keys)
        if fit is None or fit == self.layout:
            return ""
        return f"; the row looks like layout: {fit} ({LAYOUTS[fit]})"
