"""Tiny Hugging Face models made from configs (random weights, no downloads), for the weight tests.

Every parameter is redrawn from a seeded generator — norms around 1, biases non-zero — so a weight loaded
into the wrong place changes the logits. `MODELS` covers each family and each way weights are stored:
Qwen3 dense (sharded safetensors with an index), Qwen3-MoE, Qwen2.5 (q/k/v biases), Llama-3 (no q/k
norm) and a tied-embedding Qwen3 (no lm_head tensor in the file, as Qwen3-0.6B; 4 layers, for vpp).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
import transformers

from dpoc.contract import hf_config
from tests.conftest import run_subprocess, scratch
from tests.runtime.synthetic import VOCAB

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
MODELS = {  # name: (config class, config, save_pretrained's max_shard_size)
    "qwen3": ("Qwen3Config", dict(head_dim=16, rope_theta=1e6), "60KB"),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, rope_theta=1e6, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32, norm_topk_prob=True), None),
    "qwen2": ("Qwen2Config", dict(rope_theta=1e6), None),
    "llama": ("LlamaConfig", dict(rope_theta=5e5, rms_norm_eps=1e-5), None),
    # 4 layers: two virtual stages on each of two pipeline ranks
    "tied": ("Qwen3Config", dict(head_dim=16, rope_theta=1e6, tie_word_embeddings=True, num_hidden_layers=4), None),
}


def make_model(name: str, seed: int = 0, **config_overrides) -> transformers.PreTrainedModel:
    """`name`'s model (`config_overrides` change its config, e.g. its layer count), every weight seeded."""
    cls, extra, _ = MODELS[name]
    config = getattr(transformers, cls)(**{**COMMON, **extra, **config_overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in pname:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_((0.05 if pname.endswith("bias") else 0.08) * noise)
    return model.eval()


def save_model(name: str, directory: Path, seed: int = 0) -> Path:
    model = make_model(name, seed)
    shard = MODELS[name][2]
    model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    return directory


def model_flags(directory: Path) -> list[tuple[str, object]]:
    """megatron.args' model flags for the weights in `directory`, as `dpoc build` would write them."""
    config = hf_config.read_config(directory, "(directory)", str(directory))
    return hf_config.model_flags(hf_config.architecture(config, str(directory)))


def logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@cache
def converted_qwen2() -> tuple[Path, Path]:
    """The tiny qwen2 model and its `dpoc convert hf-to-mcore` output, made once per session for the tests that
    convert it unchanged (they copy, never change, them)."""
    tmp = scratch("converted-qwen2")
    hf = save_model("qwen2", tmp / "hf")
    done = run_subprocess("convert", "hf-to-mcore", hf, tmp / "mcore")
    assert done.returncode == 0, done.stderr[-3000:]
    return hf, tmp / "mcore"
