"""Each template's exact rendering: (prompt text, response text)."""

from __future__ import annotations

import pytest

from dpoc.contract.errors import DpocError
from dpoc.data.fields import BadRow
from dpoc.data.templates import Template

SYSTEM = [{"role": "system", "content": "Be brief."}]
HISTORY = [{"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "<think>greet</think>\n\nHello."}]
USER = [{"role": "user", "content": "2+2?"}]


def render(tokenizer, name, prompt, response, enable_thinking=False):
    return Template(name, tokenizer, enable_thinking, "test.yaml").render(prompt, response)


def test_chatml_with_system_and_history(tokenizer):
    assert render(tokenizer, "chatml", SYSTEM + HISTORY + USER, "4") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>greet</think>\n\nHello.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", "4<|im_end|>")


def test_qwen_adds_its_default_system(tokenizer):
    assert render(tokenizer, "qwen", USER, "4") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", "4<|im_end|>")


# the history turn's thought is removed
QWEN3_HEAD = ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
              "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_qwen3_thinking_puts_empty_thought_into_the_response(tokenizer):
    assert render(tokenizer, "qwen3", HISTORY + USER, "4", enable_thinking=True) == (
        QWEN3_HEAD, "<think>\n\n</think>\n\n4<|im_end|>\n")


def test_qwen3_without_thinking_puts_empty_thought_into_the_prompt(tokenizer):
    assert render(tokenizer, "qwen3", HISTORY + USER, "4") == (
        QWEN3_HEAD + "<think>\n\n</think>\n\n", "4<|im_end|>\n")


def test_qwen3_keeps_or_removes_a_real_thought(tokenizer):
    response = "<think>\n2 and 2\n</think>\n\n4"
    assert render(tokenizer, "qwen3", USER, response, enable_thinking=True)[1] == response + "<|im_end|>\n"
    prompt, answer = render(tokenizer, "qwen3", USER, response)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert answer == "4<|im_end|>\n"


def test_llama3_starts_with_the_tokenizer_bos(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.bos_token = "<|begin_of_text|>"
    assert render(tokenizer, "llama3", SYSTEM + USER, "4") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "4<|eot_id|>")


def test_default_ends_with_the_tokenizer_eos(tokenizer):
    history = [*HISTORY[:1], {"role": "assistant", "content": "Hello."}]
    assert render(tokenizer, "default", SYSTEM + history + USER, "4") == (
        "Be brief.\nHuman: Hi\nAssistant:Hello.<|im_end|>\nHuman: 2+2?\nAssistant:", "4<|im_end|>")


def test_tokenizer_template_splits_at_the_generation_prompt(tokenizer):
    assert render(tokenizer, "tokenizer", SYSTEM + USER, "4") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
        "4<|im_end|>\n")


def test_tokenizer_without_chat_template_is_an_error(tokenizer_dir):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    bare.chat_template = None
    with pytest.raises(DpocError) as exc:
        Template("tokenizer", bare, False, "cfg.yaml")
    assert str(exc.value) == ("cfg.yaml: template: the tokenizer has no chat template "
                              "(valid: chatml, llama3, qwen, qwen3, default)")


def test_unexpected_roles_are_bad_rows(tokenizer):
    with pytest.raises(BadRow, match=r"has a .tool. message after the first \(valid there: user, "):
        render(tokenizer, "chatml", [*USER, {"role": "tool", "content": "x"}, *USER], "4")
