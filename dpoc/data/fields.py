"""From a data row to a conversation: `map_keys` (canonical field → column) with MindSpeed-RL's meaning.

Pairwise layout (Alpaca style): the user turn is `prompt` and `query` joined by a newline (empty parts
skipped), `system` and `history` (a list of [user, assistant] pairs) come before it, `chosen` and
`rejected` are strings. Messages layout: `chosen` and `rejected` are chat message lists that share every
turn but the final assistant one; if they hold only that turn, the prompt comes from the pairwise fields.
A column mapped to `""` is disabled. Rows with an empty prompt or response are dropped, as in MindSpeed-RL.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# canonical field -> column used when map_keys does not name one (None: not read unless mapped)
DEFAULT_COLUMNS = {"prompt": "instruction", "query": "input", "system": None, "history": None,
                   "chosen": "chosen", "rejected": "rejected"}
# unmapped fields whose default column may be absent (MindSpeed-RL fails there; dpoc reads it as empty)
_OPTIONAL_DEFAULTS = {"query"}

Message = dict[str, str]


class BadRow(ValueError):
    """A row that cannot be read as a preference pair; the message says why."""


@dataclass(frozen=True)
class Conversation:
    prompt: list[Message]  # system / earlier turns / the final user turn
    chosen: str
    rejected: str


def columns_for(map_keys: Mapping[str, str]) -> dict[str, str | None]:
    return {name: map_keys.get(name, default) or None for name, default in DEFAULT_COLUMNS.items()}


def to_conversation(row: Any, map_keys: Mapping[str, str], layout: str) -> Conversation | None:
    """The row's conversation, or None when its prompt or a response is empty (dropped, and counted)."""
    if not isinstance(row, dict):
        raise BadRow(f"is not a JSON object (got {type(row).__name__})")
    get = _Getter(row, map_keys, layout)
    if layout == "messages":
        chosen_prefix, chosen = _split_messages(get.field("chosen", list), "chosen", get)
        rejected_prefix, rejected = _split_messages(get.field("rejected", list), "rejected", get)
        if chosen_prefix != rejected_prefix:
            raise BadRow(f"{get.name('chosen')} and {get.name('rejected')} differ before their final "
                         "assistant turn (they must share the prompt)")
        prompt = chosen_prefix or _pairwise_prompt(get)
    else:
        prompt = _pairwise_prompt(get)
        chosen, rejected = get.field("chosen", str), get.field("rejected", str)
    if not prompt or prompt[-1]["role"] != "user" or not prompt[-1]["content"] or not chosen or not rejected:
        return None
    return Conversation(prompt, chosen, rejected)


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


def _split_messages(messages: list, field: str, get: _Getter) -> tuple[list[Message], str]:
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BadRow(f"{get.name(field)} must be a list of {{role, content}} messages (got {m!r})")
    if not messages or messages[-1]["role"] != "assistant":
        raise BadRow(f"{get.name(field)} must end with an assistant message")
    prefix = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    return prefix, messages[-1]["content"]


class _Getter:
    """Reads canonical fields from a row and names the column and its map_keys entry in errors."""

    def __init__(self, row: dict, map_keys: Mapping[str, str], layout: str):
        self.row, self.map_keys, self.layout = row, map_keys, layout
        self.columns = columns_for(map_keys)

    def name(self, field: str) -> str:
        if field in self.map_keys:
            return f'column "{self.columns[field]}" (map_keys.{field})'
        return f'column "{self.columns[field]}" (the default for map_keys.{field})'

    def field(self, field: str, kind: type) -> Any:
        column = self.columns[field]
        if column is None:
            return None
        if column not in self.row:
            prompt_in_messages = self.layout == "messages" and field not in ("chosen", "rejected")
            if field not in self.map_keys and (field in _OPTIONAL_DEFAULTS or prompt_in_messages):
                return None
            raise BadRow(f"{self.name(field)} not found (columns: {', '.join(sorted(map(str, self.row)))}; "
                         f'map a column with map_keys.{field}, or disable it with map_keys.{field}: "")')
        value = self.row[column]
        if value is None:
            return None
        if kind is str and isinstance(value, list) and field in ("chosen", "rejected"):
            raise BadRow(f"{self.name(field)} is a message list; use layout: messages")
        if not isinstance(value, kind):
            kinds = {str: "a string", list: "a list"}
            raise BadRow(f"{self.name(field)} must be {kinds[kind]} (got {type(value).__name__})")
        return value
