"""Core attention per device: SDPA equals megatron-core's local unfused attention (loss and every gradient),
packed sequences attend only within themselves, and the npu_fusion_attention call is built as torch_npu
documents it (checked against a CPU rendering of the documented semantics, since torch_npu cannot run here).
Layouts (tp2, pp2) are compared end to end in test_runtime_packing.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType

from dpoc.contract.errors import DpocError
from dpoc.runtime.model import device as devices
from dpoc.runtime.model.attention import (
    NPU_CAUSAL_MASK_SIZE,
    PackedSequences,
    SdpaAttention,
    fusion_attention_call,
    npu_causal_mask,
)
from tests.runtime.npu_kernels import npu_fusion_attention as fake_npu_fusion_attention
from tests.runtime.synthetic import write_args, write_pairs

ROOT = Path(__file__).resolve().parents[2]
HEADS, GROUPS, HEAD_DIM = 4, 2, 16


def relative_error(a: list[float], b: list[float]) -> float:
    diff = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))
    return diff / max(math.sqrt(sum(x * x for x in a)), 1e-30)


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    """One step's policy pass of the tiny Qwen3 (GQA, q/k norm, RoPE; micro-batches padded to their
    longest pair) under the local unfused attention and under SDPA."""
    tmp = tmp_path_factory.mktemp("attention")
    args = write_args(tmp / "a.args", write_pairs(tmp / "pairs", pairs=16), tmp / "run")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-W", "ignore", str(Path(__file__).with_name("attention_probe.py")),
                          str(args), "local", "sdpa"], capture_output=True, text=True, env=env, check=True,
                         timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_sdpa_gives_the_local_attention_loss_and_gradients(probe):
    local, sdpa = probe["local"], probe["sdpa"]
    assert len(local["loss"]) == 4  # 8 pairs in micro-batches of 2
    assert sdpa["loss"] == pytest.approx(local["loss"], rel=1e-6)
    assert set(sdpa["grads"]) == set(local["grads"])
    assert any("linear_qkv" in name for name in local["grads"])
    for name, grad in local["grads"].items():
        assert any(grad), name  # every parameter takes part
        assert relative_error(grad, sdpa["grads"][name]) < 1e-5, name


def _attention() -> SdpaAttention:
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, kv_channels=HEAD_DIM)
    one_rank = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))
    return SdpaAttention(config, 1, AttnMaskType.causal, "self", pg_collection=one_rank)


def _qkv(tokens: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, heads, HEAD_DIM, generator=g, requires_grad=True)
            for heads in (HEADS, GROUPS, GROUPS)]


def test_a_packed_stream_attends_within_each_sequence():
    attention, lengths, padding = _attention(), (5, 9, 3), 3
    packed = PackedSequences.of(lengths, padding)
    assert packed.cu_seqlens_q.tolist() == [0, 5, 14, 17, 20] and packed.max_seqlen_q == 9
    q, k, v = _qkv(sum(lengths) + padding)
    out = attention(q, k, v, None, packed_seq_params=packed)
    assert out.shape == (20, HEADS * HEAD_DIM)
    out[:17].pow(2).sum().backward()
    start = 0
    for length in lengths:  # each sequence alone, as a batch of one [s, b=1, heads, d]
        part = [x.detach()[start: start + length].unsqueeze(1).requires_grad_() for x in (q, k, v)]
        alone = attention(*part, None)
        assert torch.allclose(out[start: start + length], alone.squeeze(1), atol=1e-6)
        alone.pow(2).sum().backward()
        for whole, single in zip((q, k, v), part, strict=True):
            assert torch.allclose(whole.grad[start: start + length], single.grad.squeeze(1), atol=1e-5)
        start += length
    assert torch.equal(out[17:], torch.zeros(3, HEADS * HEAD_DIM))  # padding attends to nothing


def _run_fake(call):
    return call.output(fake_npu_fusion_attention(call.query, call.key, call.value, call.head_num,
                                                 call.input_layout, **call.kwargs)[0])


def test_npu_fusion_call_for_padded_batches_is_causal_sbh():
    attention = _attention()
    q, k, v = (x.detach().view(7, 2, *x.shape[1:]) for x in _qkv(14, seed=1))  # [s=7, b=2, heads, d]
    call = fusion_attention_call(q, k, v, HEADS, attention.scale, npu_causal_mask(q.device))
    assert (call.input_layout, call.head_num, call.query.shape, call.key.shape) == ("SBH", 4, (7, 2, 64), (7, 2, 32))
    assert call.kwargs["scale"] == 1 / math.sqrt(HEAD_DIM) and "actual_seq_qlen" not in call.kwargs
    assert torch.allclose(_run_fake(call), attention(q, k, v, None), atol=1e-6)


def test_npu_fusion_call_for_packed_streams_is_tnd_with_cumulative_lengths():
    attention, packed = _attention(), PackedSequences.of((5, 9, 3), 3)
    q, k, v = (x.detach() for x in _qkv(20, seed=2))
    call = fusion_attention_call(q, k, v, HEADS, attention.scale, npu_causal_mask(q.device), packed)
    assert (call.input_layout, call.head_num) == ("TND", 4)
    assert call.kwargs["actual_seq_qlen"] == call.kwargs["actual_seq_kvlen"] == [5, 14, 17, 20]
    assert npu_causal_mask(q.device).shape == (NPU_CAUSAL_MASK_SIZE, NPU_CAUSAL_MASK_SIZE)
    assert torch.allclose(_run_fake(call)[:17], attention(q, k, v, None, packed_seq_params=packed)[:17], atol=1e-6)


def test_each_device_runs_its_fastest_kernel_unless_told(monkeypatch):
    assert devices.attention_kernel("cpu", "auto") == "sdpa"
    assert devices.attention_kernel("npu", "auto") == "npu-fusion"
    assert devices.attention_kernel("cpu", "local") == "local"
    with pytest.raises(DpocError) as err:
        devices.attention_kernel("cpu", "npu-fusion", "x.args")
    assert str(err.value) == ("x.args: --dpoc-core-attention: npu-fusion does not run on --dpoc-device cpu here "
                              "(valid: auto, sdpa, local)")
    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda name: None)
    assert devices.attention_kernel("cuda", "auto") == "sdpa"  # no TransformerEngine
    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda name: object())
    assert devices.attention_kernel("cuda", "auto") == "te"

