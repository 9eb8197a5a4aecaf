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
from dpoc.data.fields import BadRow, Conversation, to_conversation, to_example
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


    def examples(self) -> tuple[EncodedExample, EncodedExample]:
        """The pair as two unpaired examples, chosen desirable and rejected not (TRL's unpair_preference_dataset)."""
        return (EncodedExample(self.prompt_length, self.chosen, True, self.truncated),
                EncodedExample(self.prompt_length, self.rejected, False, self.truncated))


@dataclass(frozen=True)
class EncodedExample:
    """One unpaired completion (KTO): prompt then completion ids, and whether it is desirable."""

    prompt_length: int
    ids: np.ndarray
    desirable: bool
    truncated: bool

    def labels(self) -> np.ndarray:
        labels = self.ids.copy()
        labels[: self.prompt_length] = IGNORE_INDEX
        return labels


@dataclass(frozen=True)
class Outcome:
    """What became of one row: a pair, an unpaired example, a drop reason ("empty", "too_long") or a bad-row
    problem."""

    where: str
    pair: EncodedPair | None = None
    example: EncodedExample | None = None
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
        texts: list[tuple[int, str, tuple[str, ...], bool | None]] = []  # row, prompt, responses, desirable
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
            ids = iter(self.tokenize([t for _, prompt, responses, _ in texts for t in (prompt, *responses)]))
            for i, _, responses, desirable in texts:
                prompt = next(ids)
                outcomes[i] = self._fit(rows[i].where, prompt, [next(ids) for _ in responses], desirable)
        return outcomes  # type: ignore[return-value]

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _render(self, row: Row) -> tuple[str, tuple[str, ...], bool | None] | None:
        """(prompt, response texts, desirable): a pair's two responses (desirable None) or an unpaired row's
        completion; None for a row to drop as empty."""
        if self.config.layout == "unpaired":
            example = to_example(decode(row), self.config.map_keys)
            if example is None:
                return None
            prompt, completion = self.template.render(example.prompt, example.completion)
            return prompt, (completion,), example.desirable
        conversation = self._conversation(row)
        if conversation is None:
            return None
        prompt, chosen = self.template.render(conversation.prompt, conversation.chosen)
        prompt_again, rejected = self.template.render(conversation.prompt, conversation.rejected)
        if prompt_again != prompt:  # a chat template whose prompt depends on the response
            raise BadRow("the template renders different prompts for chosen and rejected")
        return prompt, (chosen, rejected), None

    def _conversation(self, row: Row) -> Conversation | None:
        return to_conversation(decode(row), self.config.map_keys, self.config.layout)

    def _fit(self, where: str, prompt: list[int], responses: list[list[int]], desirable: bool | None) -> Outcome:
        """Apply the length policy: every sequence must stay below seq_length (MindSpeed-RL drops at >=)."""
        limit = self.config.seq_length - 1
        longest = max(len(r) for r in responses)
        truncated = len(prompt) + longest > limit
        if truncated:
            if self.config.truncate == "prompt" and longest < limit:
                prompt = prompt[len(prompt) + longest - limit:]  # keep the end: the latest turn
            elif self.config.truncate == "response" and len(prompt) < limit:
                responses = [r[: limit - len(prompt)] for r in responses]
            else:
                return Outcome(where, dropped="too_long")
        sequences = [np.asarray(prompt + r, dtype=np.int32) for r in responses]
        if desirable is not None:
            return Outcome(where, example=EncodedExample(len(prompt), sequences[0], desirable, truncated))
        return Outcome(where, pair=EncodedPair(len(prompt), *sequences, truncated))
