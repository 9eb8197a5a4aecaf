"""Rows → token ids: template rendering, tokenization, labels (-100 over the prompt), length policy.

Prompt and response are tokenized separately (as MindSpeed-RL does), so the label boundary is always a
token boundary. One `PairEncoder` lives in each worker process; it returns plain results that the main
process writes in input order, so the output does not depend on the number of workers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpoc.contract.errors import DpocError, Problem
from dpoc.data.config import PreprocessConfig
from dpoc.data.fields import BadRow, Conversation, to_conversation
from dpoc.data.readers import Row, decode
from dpoc.data.templates import Template

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedPair:
    prompt_length: int  # after truncation; the label mask covers exactly these tokens
    chosen: np.ndarray  # int32 token ids, prompt then chosen response
    rejected: np.ndarray
    truncated: bool

    def labels(self, ids: np.ndarray) -> np.ndarray:
        labels = ids.copy()
        labels[: self.prompt_length] = IGNORE_INDEX
        return labels


@dataclass(frozen=True)
class Outcome:
    """What became of one row: a pair, a drop reason ("empty", "too_long") or a bad-row problem."""

    where: str
    pair: EncodedPair | None = None
    dropped: str | None = None
    problem: str | None = None


def load_tokenizer(path: str, config_file: str):
    import os

    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise DpocError([Problem(config_file, "tokenizer", f"{path} is not a directory (a Hugging Face "
                                 "tokenizer directory is needed; relative paths are taken from "
                                 f"{os.getcwd()})")])
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        problem = Problem(config_file, "tokenizer", f"cannot load a tokenizer from {path} ({exc})")
        raise DpocError([problem]) from None


class PairEncoder:
    def __init__(self, config: PreprocessConfig):
        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer, config.source)
        self.template = Template(config.template, self.tokenizer, config.enable_thinking, config.source)

    def encode(self, rows: list[Row]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(rows)
        texts: list[tuple[int, str, str, str]] = []
        for i, row in enumerate(rows):
            try:
                rendered = self._render(row)
            except BadRow as exc:
                outcomes[i] = Outcome(row.where, problem=str(exc))
                continue
            if rendered is None:
                outcomes[i] = Outcome(row.where, dropped="empty")
                continue
            texts.append((i, *rendered))
        if texts:
            ids = self.tokenize([t for _, *parts in texts for t in parts])
            for n, (i, *_) in enumerate(texts):
                prompt, chosen, rejected = ids[3 * n: 3 * n + 3]
                outcomes[i] = self._fit(rows[i].where, prompt, chosen, rejected)
        return outcomes  # type: ignore[return-value]

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _render(self, row: Row) -> tuple[str, str, str] | None:
        """(prompt, chosen response, rejected response) texts, or None for a row to drop as empty."""
        conversation = self._conversation(row)
        if conversation is None:
            return None
        prompt, chosen = self.template.render(conversation.prompt, conversation.chosen)
        prompt_again, rejected = self.template.render(conversation.prompt, conversation.rejected)
        if prompt_again != prompt:  # a chat template whose prompt depends on the response
            raise BadRow("the template renders different prompts for chosen and rejected")
        return prompt, chosen, rejected

    def _conversation(self, row: Row) -> Conversation | None:
        return to_conversation(decode(row), self.config.map_keys, self.config.layout)

    def _fit(self, where: str, prompt: list[int], chosen: list[int], rejected: list[int]) -> Outcome:
        """Apply the length policy: every sequence must stay below seq_length (MindSpeed-RL drops at >=)."""
        limit = self.config.seq_length - 1
        longest = max(len(chosen), len(rejected))
        truncated = len(prompt) + longest > limit
        if truncated:
            if self.config.truncate == "prompt" and longest < limit:
                prompt = prompt[len(prompt) + longest - limit:]  # keep the end: the latest turn
            elif self.config.truncate == "response" and len(prompt) < limit:
                chosen, rejected = chosen[: limit - len(prompt)], rejected[: limit - len(prompt)]
            else:
                return Outcome(where, dropped="too_long")
        pair = EncodedPair(len(prompt), np.asarray(prompt + chosen, dtype=np.int32),
                           np.asarray(prompt + rejected, dtype=np.int32), truncated)
        return Outcome(where, pair=pair)
