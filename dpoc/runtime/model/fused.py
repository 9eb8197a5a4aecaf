"""The fused elementwise kernels of a transformer layer on npu: RMSNorm, rotary embedding, SwiGLU
(`dpoc/contract/kernels.py` `FUSED` says which device runs which; docs/devices.md says why).

Each replaces one unfused megatron-core / torch path and computes the same function (tested equal on the
stand-ins, tests/runtime/test_fused_kernels.py):
- `rms-norm`: `NpuRMSNorm`, torch's RMSNorm module (same `weight`, so checkpoints and the Hugging Face mapping
  do not change) whose forward is `torch_npu.npu_rms_norm(x, weight, epsilon)`.
- `rotary`: `npu_rotary`, megatron's `apply_rotary_pos_emb` with `torch_npu.npu_rotary_mul(t, cos, sin)` for
  the [s, b, heads, d] layout; packed (`thd`) streams and partial or interleaved rotation keep megatron's path.
- `swiglu`: `NpuSwiGLU`, the MLP activation module megatron builds from the spec's `activation_func` (with
  `use_te_activation_func`, which only means "build the spec's module"), `torch_npu.npu_swiglu(x, dim=-1)`;
  the grouped experts call `swiglu` directly.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.transformer.module import MegatronModule

KERNELS = {"rms-norm": "npu_rms_norm", "rotary": "npu_rotary_mul", "swiglu": "npu_swiglu"}


class NpuRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm, computed by npu_rms_norm (which also returns 1/rms; the backward is the kernel's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch_npu

        return torch_npu.npu_rms_norm(x, self.weight, epsilon=self.eps)[0]


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(a) * b for x = cat(a, b) along the last axis, in one npu_swiglu call."""
    import torch_npu

    return torch_npu.npu_swiglu(x, dim=-1)


class NpuSwiGLU(MegatronModule):
    """`swiglu` as the module megatron's MLP builds for its activation (a MegatronModule: megatron asks every
    child of the MLP for its sharded state, here none)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x)


def npu_rotary(t: torch.Tensor, freqs: torch.Tensor, config, cu_seqlens: torch.Tensor | None = None,
               mscale: float = 1.0, cp_group=None) -> torch.Tensor:
    """megatron's apply_rotary_pos_emb, with the unpacked full-width rotation through npu_rotary_mul:
    t * cos + rotate_half(t) * sin, cos and sin of freqs [s, 1, 1, d] in t's dtype as megatron makes them."""
    if cu_seqlens is not None or config.rotary_interleaved or config.multi_latent_attention \
            or freqs.shape[-1] != t.shape[-1]:
        return rope_utils.apply_rotary_pos_emb(t, freqs, config, cu_seqlens, mscale, cp_group)
    import torch_npu

    cos, sin = ((f(freqs) * mscale).to(t.dtype) for f in (torch.cos, torch.sin))
    return torch_npu.npu_rotary_mul(t, cos, sin)


def install_rotary() -> None:
    """megatron's attention calls `apply_rotary_pos_emb` by its module-level name: point it at `npu_rotary`."""
    from megatron.core.transformer import attention

    attention.apply_rotary_pos_emb = npu_rotary
