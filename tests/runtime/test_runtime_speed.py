"""The runtime's speed fixes that a CPU can check: no device-to-host reads where megatron-core's fallbacks make
one per tensor (issue 20). A read is counted where a tensor becomes a Python number: `item`, `float`, `int`,
`tolist`, or `torch.tensor` of (nested) lists of tensors (one per tensor)."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

READS = {torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.tolist}


class HostReads(TorchFunctionMode):
    """Counts device-to-host reads; megatron's `device="cuda"` factories get the CPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("device") == "cuda":
            kwargs["device"] = "cpu"
        if func in READS:
            self.count += 1
        elif func is torch.tensor:
            self.count += _tensors_in(args[0])
        return func(*args, **kwargs)


def _tensors_in(data: object) -> int:
    if isinstance(data, (list, tuple)):
        return sum(map(_tensors_in, data))
    return int(torch.is_tensor(data))


def _grads() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator) for shape in [(8, 4), (3,), (5, 5, 2), (1,)] * 8]


def test_the_gradient_norm_reads_nothing_back_per_tensor():
    from megatron.core.utils import local_multi_tensor_l2_norm

    from dpoc.runtime.model.device import gradient_l2_norm

    grads = _grads()
    with HostReads() as megatron:
        expected, _ = local_multi_tensor_l2_norm(65536, None, [grads], False)
    with HostReads() as ours:
        norm, _ = gradient_l2_norm(65536, None, [grads], False)
    assert megatron.count == len(grads) + 1  # what the fix removes: one read per gradient tensor, one for the sum
    assert ours.count == 0
    assert norm.shape == expected.shape == (1,) and norm.dtype == torch.float32
    assert torch.allclose(norm, expected, rtol=1e-6)


def test_megatron_computes_its_gradient_norm_with_it():
    from megatron.core.optimizer import clip_grads

    from dpoc.runtime.model import device

    device.fill_megatron_gaps()
    assert clip_grads.l2_norm_impl is device.gradient_l2_norm


def test_the_policy_overlaps_its_gradient_reduction_and_with_the_flag_its_parameter_gather(tmp_path):
    """overlap_grad_reduce on (test_runtime_train's dp2, ep2, pp2-vpp2 and tp2xpp2 layouts run with it and give
    the one-process losses and gradient norms); overlap_param_gather with `--overlap-param-gather` (test_runtime_checkpoint runs it at dp2,
    saves and resumes; test_runtime_model's refusal without the distributed optimizer)."""
    from dpoc.contract import megatron_args
    from dpoc.runtime.step.session import ddp_config
    from tests.runtime.synthetic import write_args

    def config(name: str, **kwargs):
        path = write_args(tmp_path / f"{name}.args", "pairs", tmp_path / name, **kwargs)
        return ddp_config(megatron_args.parse([f"@{path}"]))

    plain, overlapped = config("plain"), config("overlap", extra=[("--overlap-param-gather", True)])
    assert plain.overlap_grad_reduce and not plain.overlap_param_gather
    assert plain.use_distributed_optimizer and plain.grad_reduce_in_fp32
    assert overlapped.overlap_grad_reduce and overlapped.overlap_param_gather


def test_packed_sequence_boundaries_stay_on_the_host_for_megatrons_rotary():
    """A packed micro-batch moved to a device keeps cu_seqlens on the host, so megatron's thd rotary embedding
    (its `.tolist()` of them, in every layer) reads no device tensor: on the meta device, where nothing can be
    read back, it runs (a meta cu_seqlens raises) and gives each sequence positions from 0."""
    import types

    from megatron.core.models.common.embeddings import rope_utils

    from dpoc.runtime.model.attention import PackedSequences
    from dpoc.runtime.step.data import MicroBatch

    packed = PackedSequences.of((5, 9, 3), 3)
    stream = torch.zeros(1, 20, dtype=torch.long)
    batch = MicroBatch(stream, stream, torch.ones(6, 20), stream, real_tokens=17, row_tokens=20, packed=packed)
    moved = batch.to(torch.device("meta"))
    assert moved.tokens.device.type == "meta" and moved.packed.cu_seqlens_q.device.type == "cpu"
    config = types.SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False)
    group = types.SimpleNamespace(size=lambda: 1, rank=lambda: 0)
    t, freqs = torch.empty(20, 2, 8, device="meta"), torch.empty(9, 1, 1, 8, device="meta")
    out = rope_utils.apply_rotary_pos_emb(t, freqs, config, cu_seqlens=moved.packed.cu_seqlens_q, cp_group=group)
    assert out.shape == t.shape and out.device.type == "meta"
    with pytest.raises(NotImplementedError):  # what a device-resident cu_seqlens meets in the same call
        rope_utils.apply_rotary_pos_emb(t, freqs, config, cu_seqlens=packed.cu_seqlens_q.to("meta"), cp_group=group)
