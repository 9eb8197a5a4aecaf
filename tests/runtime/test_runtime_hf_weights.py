"""Hugging Face weights straight into the sharded runtime: the runtime's logits equal transformers' on the same
tokens, in one process and in every layout (tp2, pp2, ep2, ep2×etp2 with sequence parallelism).

The tiny models (tests/runtime/hf_models.py) are written once per module; each layout is one probe run
(`tests/runtime/logits_probe.py`, torchrun on 127.0.0.1 with gloo) over all the models it applies to. fp32
throughout; "within 1e-4 relative" means max |ours - theirs| <= 1e-4 * max |theirs| over all logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.runtime.hf_models import MODELS, logits, model_flags, save_model
from tests.runtime.synthetic import VOCAB, write_args
from tests.runtime.test_runtime_train import run_module

DENSE = ("qwen3", "qwen2", "llama", "tied")
LAYOUTS = {  # layout: (processes, layout flags, models)
    "1proc": (1, [], tuple(MODELS)),
    "tp2": (2, [("--tensor-model-parallel-size", 2)], DENSE),
    "pp2": (2, [("--pipeline-model-parallel-size", 2)], ("qwen3", "tied", "qwen3_moe")),
    "pp2-vpp2": (2, [("--pipeline-model-parallel-size", 2), ("--num-layers-per-virtual-pipeline-stage", 1)],
                 ("tied",)),
    "ep2": (2, [("--expert-model-parallel-size", 2)], ("qwen3_moe",)),
    # loaded into grouped-GEMM experts, then (through a distributed checkpoint) into sequential ones
    "ep2-grouped": (2, [("--expert-model-parallel-size", 2), ("--moe-grouped-gemm", True)], ("qwen3_moe",)),
    "ep2xetp2-sp": (4, [("--expert-model-parallel-size", 2), ("--tensor-model-parallel-size", 2),
                        ("--expert-tensor-parallel-size", 2), ("--sequence-parallel", True)], ("qwen3_moe",)),
}
CASES = [(layout, model) for layout, (_, _, models) in LAYOUTS.items() for model in models]


def hf_args(tmp: Path, name: str, weights: Path, layout=(), **kwargs) -> Path:
    return write_args(tmp / f"{name}.args", str(tmp / "pairs"), tmp / "runs" / name, layout=list(layout),
                      model=model_flags(weights), init=[("--dpoc-init", "hf"), ("--dpoc-hf-weights", str(weights))],
                      **kwargs)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """Every tiny model saved once; the tokens the logits are compared on."""
    tmp = tmp_path_factory.mktemp("hf")
    for name in MODELS:
        save_model(name, tmp / name)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, tmp / "tokens.pt")
    return tmp


@pytest.fixture(scope="module")
def probe(hf_dir):
    """The runtime's logits per (layout, model). One probe launch per process count covers all its layouts,
    made when a test first needs one of them."""
    out = hf_dir / "logits"
    launched: set[int] = set()

    def get(layout: str, model: str) -> torch.Tensor:
        processes = LAYOUTS[layout][0]
        if processes not in launched:
            launched.add(processes)
            out.mkdir(exist_ok=True)
            files = [hf_args(hf_dir, f"{name}-{m}", hf_dir / m, flags)
                     for name, (count, flags, models) in LAYOUTS.items() if count == processes for m in models]
            result = run_module(["-m", "tests.runtime.logits_probe", str(hf_dir / "tokens.pt"), str(out),
                                 *map(str, files)], processes)
            assert result.returncode == 0, result.stderr[-4000:]
        return torch.load(out / f"{layout}-{model}.pt")

    return get


def test_the_sharded_checkpoint_and_the_tied_model_are_stored_as_intended(hf_dir):
    assert (hf_dir / "qwen3/model.safetensors.index.json").is_file()
    from safetensors import safe_open

    with safe_open(str(hf_dir / "tied/model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())


@pytest.mark.slow
def test_grouped_gemm_experts_hold_the_hf_experts(hf_dir, probe):
    probe("ep2-grouped", "qwen3_moe")
    diffs = json.loads((hf_dir / "logits/ep2-grouped-qwen3_moe.json").read_text())
    assert diffs == {"weight1": 0.0, "weight2": 0.0, "experts": 4}  # rank 0: its 2 experts in each of 2 layers


@pytest.mark.parametrize(("layout", "model"), CASES, ids=[f"{lay}-{m}" for lay, m in CASES])
@pytest.mark.slow
def test_logits_equal_transformers(hf_dir, probe, layout, model):
    ours = probe(layout, model)
    theirs = logits(hf_dir / model, torch.load(hf_dir / "tokens.pt"))
    assert ours.shape == theirs.shape == (2, 16, VOCAB)
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
