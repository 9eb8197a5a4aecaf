"""Chat templates: a conversation becomes prompt text (labels -100) and response text (trained on).

`tokenizer` uses the tokenizer's own chat template through transformers' `apply_chat_template`: the
response is what the full conversation adds after the prompt rendered with a generation prompt. The
named templates follow the MindSpeed-RL / LLaMA-Factory formats of the same names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from dpoc.contract.errors import DpocError, Problem
from dpoc.data.fields import BadRow, Message

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"
_THOUGHT = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


@dataclass(frozen=True)
class ChatFormat:
    """A turn-based text format; `{content}` marks where the text goes."""

    system: str
    user: str  # includes the assistant header that opens the reply
    assistant_end: str  # closes a reply; part of the response, so the model learns to stop
    separator: str = ""  # after a finished reply, before the next turn (so it is prompt, not response)
    prefix: str = ""  # text before everything (llama3: the tokenizer's BOS token)
    default_system: str = ""
    reasoning: bool = False  # qwen3: think blocks (see `render`)

    def render(self, prompt: list[Message], response: str, enable_thinking: bool) -> tuple[str, str]:
        messages = list(prompt)
        system = self.default_system
        if messages and messages[0]["role"] == "system":
            system = messages.pop(0)["content"]
        text = self.prefix + (self.system.replace("{content}", system) if system else "")
        for m in messages:
            if m["role"] == "user":
                text += self.user.replace("{content}", m["content"])
            elif m["role"] == "assistant":
                content = _THOUGHT.sub("", m["content"]) if self.reasoning else m["content"]
                text += content + self.assistant_end + self.separator
            else:
                raise BadRow(f"has a {m['role']!r} message after the first (valid there: user, assistant)")
        if self.reasoning:
            if not enable_thinking:
                response = _THOUGHT.sub("", response)
            if THINK_OPEN not in response and THINK_CLOSE not in response:
                if enable_thinking:
                    response = EMPTY_THOUGHT + response  # trained on, as MindSpeed-RL does
                else:
                    text += EMPTY_THOUGHT  # part of the prompt: no loss
        return text, response + self.assistant_end


_CHATML = dict(system="<|im_start|>system\n{content}<|im_end|>\n",
               user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n")

NAMED = {
    "chatml": ChatFormat(**_CHATML, assistant_end="<|im_end|>", separator="\n"),
    "qwen": ChatFormat(**_CHATML, assistant_end="<|im_end|>", separator="\n",
                       default_system="You are a helpful assistant."),
    # qwen3 ends a reply with "<|im_end|>\n" (trained on) instead of a separator before the next turn
    "qwen3": ChatFormat(**_CHATML, assistant_end="<|im_end|>\n", reasoning=True),
    "llama3": ChatFormat(system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
                         user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                              "<|start_header_id|>assistant<|end_header_id|>\n\n",
                         assistant_end="<|eot_id|>"),
}


class Template:
    """Renders conversations for one tokenizer; `default` needs its EOS, `tokenizer` its chat template."""

    def __init__(self, name: str, tokenizer: Any, enable_thinking: bool, config_file: str):
        self.name, self.tokenizer, self.enable_thinking = name, tokenizer, enable_thinking
        self.config_file = config_file
        if name == "default":
            eos = tokenizer.eos_token or ""
            self.format = ChatFormat(system="{content}\n", user="Human: {content}\nAssistant:",
                                     assistant_end=eos, separator="\n")
        elif name == "tokenizer":
            if not getattr(tokenizer, "chat_template", None):
                raise DpocError([Problem(config_file, "template", "the tokenizer has no chat template "
                                         f"(valid: {', '.join(sorted(NAMED))}, default)")])
            self.format = None
        elif name == "llama3":
            self.format = replace(NAMED[name], prefix=tokenizer.bos_token or "")
        else:
            self.format = NAMED[name]

    def render(self, prompt: list[Message], response: str) -> tuple[str, str]:
        if self.format is not None:
            return self.format.render(prompt, response, self.enable_thinking)
        apply = self.tokenizer.apply_chat_template
        kwargs = dict(tokenize=False, enable_thinking=self.enable_thinking)
        from jinja2 import TemplateError

        try:
            head = apply(prompt, add_generation_prompt=True, **kwargs)
            full = apply([*prompt, {"role": "assistant", "content": response}], **kwargs)
        except TemplateError as exc:
            raise BadRow(f"the tokenizer's chat template rejects this conversation ({exc})") from None
        if not full.startswith(head):
            raise DpocError([Problem(self.config_file, "template", "the tokenizer's chat template renders "
                                     "the prompt differently inside the full conversation, so the response "
                                     "cannot be separated from it (use a named template: qwen3, qwen, "
                                     "chatml, llama3, default)")])
        return head, full[len(head):]
