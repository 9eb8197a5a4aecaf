"""The runtime's speed fixes that a CPU can check: no device-to-host reads where megatron-core's fallbacks make
one per tensor (issue 20). A read is counted where a tensor becomes a Python number: `item`, `float`, `int`,
`tolist`, or `torch.tensor` of (nested) lists of tensors (one per tensor)."""

from __future__ import annotations

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


def test_the_policy_overlaps_its_gradient_reduction_but_not_the_parameter_gather(tmp_path):
    """overlap_grad_reduce on (test_runtime_train's dp2, ep2, pp2-vpp2 and tp2xpp2 layouts run with it and give
    the one-process losses and gradient norms); overlap_param_gather off, for the reason session.ddp_config gives."""
    from dpoc.contract import megatron_args
    from dpoc.runtime.step.session import ddp_config
    from tests.runtime.synthetic import write_args

    args = megatron_args.parse([f"@{write_args(tmp_path / 'm.args', 'pairs', tmp_path / 'run')}"])
    config = ddp_config(args)
    assert config.overlap_grad_reduce and not config.overlap_param_gather
    assert config.use_distributed_optimizer and config.grad_reduce_in_fp32
