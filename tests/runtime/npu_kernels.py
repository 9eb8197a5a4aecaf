"""torch_npu's kernels as the Ascend PyTorch API reference documents them, computed with torch on the CPU: the
stand-ins the device stubs (device_stubs.py) install as `torch_npu.<name>`, and the references the runtime's
calls into them are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KERNELS = ("npu_fusion_attention", "npu_grouped_matmul", "npu_rms_norm", "npu_rotary_mul", "npu_swiglu")


def npu_fusion_attention(query, key, value, head_num, input_layout, *, pse, padding_mask, atten_mask,
                              scale, keep_prob, pre_tockens, next_tockens, inner_precise, sparse_mode,
                              actual_seq_qlen=None, actual_seq_kvlen=None):
    """torch_npu.npu_fusion_attention as its documentation describes it (Ascend PyTorch API reference,
    npu_fusion_attention): SBH = [S, B, N*D]; TND = [T, N, D] with actual_seq_qlen/kvlen the cumulative
    sequence ends (lengths 2 2 2 -> 2 4 6); atten_mask True = masked; sparse_mode 3 (rightDownCausal)
    takes the 2048 x 2048 compressed upper-triangular mask and aligns causality to the bottom right, so with
    more keys than queries (Skv > Sq, S1 != S2 in SBH; actual_seq_kvlen's lengths in TND) query i sees keys up
    to i + Skv - Sq; N2 key/value heads must divide N1."""
    assert pse is None and padding_mask is None and keep_prob == 1.0 and inner_precise == 0
    assert sparse_mode == 3 and atten_mask.dtype == torch.bool
    assert torch.equal(atten_mask, torch.ones(2048, 2048, dtype=torch.bool).triu(1))
    if input_layout == "SBH":
        (s, b, width), skv = query.shape, key.shape[0]
        d = width // head_num
        q = query.view(s, b, -1, d).transpose(0, 1).reshape(b * s, -1, d)
        k, v = (x.view(skv, b, -1, d).transpose(0, 1).reshape(b * skv, -1, d) for x in (key, value))
        q_ends, kv_ends = [s * (i + 1) for i in range(b)], [skv * (i + 1) for i in range(b)]
    else:
        assert input_layout == "TND" and len(actual_seq_qlen) == len(actual_seq_kvlen)
        assert actual_seq_qlen[-1] == query.shape[0] and actual_seq_kvlen[-1] == key.shape[0]
        q, k, v, q_ends, kv_ends = query, key, value, actual_seq_qlen, actual_seq_kvlen
    assert head_num == q.shape[1] and head_num % k.shape[1] == 0
    k, v = (x.repeat_interleave(head_num // x.shape[1], dim=1) for x in (k, v))
    out, q_start, kv_start = torch.empty_like(q), 0, 0
    for q_end, kv_end in zip(q_ends, kv_ends, strict=True):
        scores = torch.einsum("qnd,knd->nqk", q[q_start:q_end], k[kv_start:kv_end]) * scale
        sq, skv = q_end - q_start, kv_end - kv_start
        assert 0 < sq <= skv
        scores = scores.masked_fill(torch.ones(sq, skv, dtype=torch.bool).triu(1 + skv - sq), float("-inf"))
        out[q_start:q_end] = torch.einsum("nqk,knd->qnd", scores.softmax(-1), v[kv_start:kv_end])
        q_start, kv_start = q_end, kv_end
    if input_layout == "SBH":
        out = out.view(b, s, -1).transpose(0, 1)
    return out, None, None, None, 0, 0, 0


def npu_grouped_matmul(x, weight, *, bias=None, group_list=None, split_item=0, group_type=None,
                       group_list_type=0, output_dtype=None, **quantisation):
    """torch_npu.npu_grouped_matmul (Ascend PyTorch API reference, npu_grouped_matmul), the unquantised cases
    the runtime uses: `x` one tensor; `group_list` the group ends along the split axis (group_list_type 0,
    cumulative) or the group sizes (1). group_type 0 splits x's rows (M): group i computes x[rows_i] @ W_i
    with `weight` one [G, K, N] tensor or G [K, N] tensors, into one [M, N] output (split_item 2 or 3).
    group_type 2 splits the reduction axis (K): x [M, K] and weight [K, N] give G outputs x[:, k_i] @ W[k_i],
    stacked [G, M, N] (split_item 3)."""
    assert bias is None and output_dtype is None and not any(v is not None for v in quantisation.values())
    assert len(x) == 1 and split_item in (2, 3) and group_list_type in (0, 1)
    sizes = torch.as_tensor(group_list).tolist()
    if group_list_type == 0:
        sizes = [end - start for start, end in zip([0, *sizes[:-1]], sizes, strict=True)]
    if group_type == 0:
        weights = list(weight[0]) if len(weight) == 1 else list(weight)
        assert len(weights) == len(sizes) and sum(sizes) == x[0].shape[0]
        return [torch.cat([part @ w for part, w in zip(x[0].split(sizes), weights, strict=True)])]
    assert group_type == 2 and split_item == 3 and len(weight) == 1 and sum(sizes) == x[0].shape[1]
    return [torch.stack([a @ b for a, b in zip(x[0].split(sizes, dim=1), weight[0].split(sizes), strict=True)])]


def npu_rms_norm(x, gamma, epsilon=1e-6):
    """torch_npu.npu_rms_norm: (x * rsqrt(mean(x^2 over gamma's dims) + epsilon) * gamma, rstd)."""
    dims = tuple(range(-gamma.dim(), 0))
    rstd = torch.rsqrt(x.float().pow(2).mean(dims, keepdim=True) + epsilon)
    return (x.float() * rstd).to(x.dtype) * gamma, rstd


def npu_rotary_mul(x, r1, r2):
    """torch_npu.npu_rotary_mul: x * r1 + rotate_half(x) * r2, rotate_half(x) = cat(-x2, x1) of x's halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * r1 + torch.cat((-x2, x1), dim=-1) * r2


def npu_swiglu(x, dim=-1):
    """torch_npu.npu_swiglu: silu(a) * b for x = cat(a, b) along `dim`."""
    a, b = x.chunk(2, dim=dim)
    return F.silu(a) * b
