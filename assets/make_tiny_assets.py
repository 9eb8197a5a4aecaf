"""Write the tiny assets for the CPU end-to-end run: a small BPE tokenizer and an orca-style DPO file.

    python assets/make_tiny_assets.py          # writes assets/tiny/{tokenizer/,orca_tiny.jsonl}

Deterministic: running it twice gives byte-identical files. The preference signal is learnable by a tiny
model: chosen answers are correct short arithmetic / copy / comparison answers, rejected ones are wrong
or refuse to answer. Tests import `build_tokenizer` from here, so there is one tokenizer recipe.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 1234
PAIRS = 256
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]  # added (not special) tokens, as in Qwen3's tokenizer
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SYSTEMS = ["", "You are a helpful assistant.", "You are a careful tutor. Answer briefly."]
WORDS = ["red", "green", "blue", "apple", "pear", "plum", "river", "stone", "cloud", "bird", "fish", "tree",
         "house", "door", "lamp", "book", "cat", "dog", "sun", "moon", "star", "road", "hill", "lake", "wind",
         "rain", "snow", "leaf", "seed", "root"]
REFUSALS = ["I do not know.", "Sorry, I cannot help with that.", "That is too hard for me."]
# extra text so the tokenizer has merges for ordinary English, not only the generated data
GENERAL_TEXT = ("The quick brown fox jumps over the lazy dog. Hello world! Question: what is the answer? "
                "Answer: the answer is short. Human: Assistant: system user assistant think")


def build_tokenizer(out_dir: Path, corpus: list[str]) -> None:
    """Train a byte-level BPE on `corpus` and save it as a standard Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_tokens(THINK_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(str(out_dir))
    # transformers 5 names its class TokenizersBackend; the 4.x name loads in both (MindSpeed-RL pins 4.57)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def make_pairs(seed: int = SEED, count: int = PAIRS) -> list[dict[str, str]]:
    rng = random.Random(seed)
    tasks = [_addition, _copy, _compare]
    pairs = []
    for i in range(count):
        question, right, wrong = tasks[i % len(tasks)](rng)
        rejected = rng.choice(REFUSALS) if rng.random() < 0.3 else wrong
        system = rng.choice(SYSTEMS)
        pairs.append({"system": system, "question": question, "chosen": right, "rejected": rejected})
    return pairs


def _addition(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(1, 49), rng.randint(1, 49)
    wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3, 10])
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"{a} + {b} = {wrong}."


def _copy(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, 3)
    shuffled = words[1:] + words[:1]
    return f"Repeat after me: {' '.join(words)}", " ".join(words), " ".join(shuffled)


def _compare(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(1, 100), 2)
    return f"Which is larger, {a} or {b}?", f"{max(a, b)} is larger.", f"{min(a, b)} is larger."


def main() -> None:
    out = Path(__file__).resolve().parent / "tiny"
    pairs = make_pairs()
    texts = [p[k] for p in pairs for k in ("question", "chosen", "rejected")]
    corpus = [GENERAL_TEXT, *SYSTEMS, *REFUSALS, *texts]
    build_tokenizer(out / "tokenizer", corpus)
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    (out / "orca_tiny.jsonl").write_text(lines, encoding="utf-8")
    print(f"wrote {out / 'tokenizer'} and {out / 'orca_tiny.jsonl'} ({len(pairs)} pairs)")


if __name__ == "__main__":
    main()
