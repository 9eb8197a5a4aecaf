"""Core attention for megatron-core's local layer spec: one kernel per device, causal, packed or not.

megatron-core's local `DotProductAttention` materialises the [b, heads, s, s] scores and probabilities and
cannot take packed sequences. The modules here replace it in the layer spec (`model.block_spec`); the
device module (`device.py`) decides which one a run uses:

- `sdpa` (cpu, and cuda without TransformerEngine): torch's `scaled_dot_product_attention` with
  `is_causal=True` (the CPU flash kernel; no s x s tensor is kept for backward). A packed micro-batch is
  attended one sequence at a time, each a causal call on its slice of the stream, so attention never
  crosses a sequence and costs per sequence, not per row (`bench/attention_cpu.py` measured the
  alternatives: one call over the stream with a block-diagonal mask, and padded batches of sequences).
- `npu-fusion` (npu): torch_npu's `npu_fusion_attention` as MindSpeed calls it: SBH layout, or TND with the
  cumulative `actual_seq_qlen`/`actual_seq_kvlen` for packed micro-batches, causal through sparse mode 3
  and the 2048 x 2048 compressed mask. `fusion_attention_call` builds the arguments (pure, tested on cpu).
- `te` (cuda with TransformerEngine): megatron-core's own `TEDotProductAttention`.
- `local`: megatron-core's `DotProductAttention`, unchanged (the reference the others are tested against).

Layouts follow megatron: q [s, b, heads, d] and k, v [s, b, groups, d] (GQA: groups < heads), or, for a
packed micro-batch (`PackedSequences`, megatron's `thd` format), [t, heads, d] and [t, groups, d]. Heads
are this tensor-parallel rank's share; sequence parallelism gathers the sequence before attention, so the
kernels see whole sequences, except under context parallelism: then SDPA and npu-fusion hold this CP rank's
two chunks of each sequence and gather the keys and values (`_CoreAttention._context_parallel`). The
softmax scale is 1/sqrt(d) unless the config sets one; no dropout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from dpoc.runtime.model.context_parallel import ContextShard

if TYPE_CHECKING:
    from torch.nn.attention.bias import CausalBias

# npu_fusion_attention's sparse mode 3 (rightDownCausal) reads causality from this compressed mask
NPU_CAUSAL_MASK_SIZE = 2048
NPU_CAUSAL_SPARSE_MODE = 3


@dataclass
class PackedSequences(PackedSeqParams):
    """megatron's `thd` parameters of one packed micro-batch, plus what the kernels read on the host: each
    sequence's length in stream order, the last `padding` tokens forming one padding sequence (attended only
    by itself, never by a real token). `cu_seqlens_*` are made once, on the host, and stay there when the
    micro-batch moves to the device: megatron's packed rotary embedding reads them back (`.tolist()`) in every
    layer of every micro-batch, which on a device tensor is a wait each time; dpoc's kernels read `lengths`
    (TransformerEngine's attention gets device copies, `_te_attention`)."""

    lengths: tuple[int, ...] = ()
    padding: int = 0

    @classmethod
    def of(cls, lengths: tuple[int, ...], padding: int) -> PackedSequences:
        packed = cls(qkv_format="thd", lengths=tuple(lengths), padding=padding)
        # megatron's thd rotary embedding restarts positions at each cu_seqlens boundary
        packed.cu_seqlens_q = packed.cu_seqlens_kv = torch.tensor(
            [0, *accumulate(packed.segments)], dtype=torch.int32, device="cpu")
        packed.max_seqlen_q = packed.max_seqlen_kv = max(packed.segments)
        return packed

    @property
    def segments(self) -> tuple[int, ...]:
        """The lengths the kernels see: the sequences, then the padding as one more sequence."""
        return (*self.lengths, self.padding) if self.padding else self.lengths

    def sequences(self, stream: torch.Tensor) -> list[torch.Tensor]:
        """The real sequences of a stream [t, ...] (views)."""
        return list(stream[: sum(self.lengths)].split(self.lengths))

    def rows(self, stream: torch.Tensor) -> torch.Tensor:
        """The real sequences of a stream [t, ...] as zero-padded rows [sequences, longest, ...]."""
        return padded_rows(self.sequences(stream))


def padded_rows(sequences: list[torch.Tensor]) -> torch.Tensor:
    """Sequences [length, ...] as zero-padded rows [count, longest, ...] (one sequence: a view)."""
    if len(sequences) == 1:
        return sequences[0].unsqueeze(0)
    longest = max(len(x) for x in sequences)
    return torch.stack([F.pad(x, (0, 0) * (x.dim() - 1) + (0, longest - len(x))) for x in sequences])


class _CoreAttention(MegatronModule):
    """What every kernel shares: this rank's heads and query groups, the scale, causal masking only."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"dpoc's core attention is causal only (got {attn_mask_type})")
        tp = pg_collection.tp.size() if pg_collection is not None else \
            parallel_state.get_tensor_model_parallel_world_size()
        self.cp = config.context_parallel_size
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def _context_parallel(self, query, key, value, packed: PackedSequences | None):
        """This rank's queries (its two chunks of each sequence, `context_parallel.py`) against the keys and
        values gathered from the CP group: each chunk attends the prefix of its sequence up to its own end,
        causal aligned to the bottom right (`_lower_right`, the kernel's), so no mask is materialised."""
        thd = packed is not None
        if thd:  # [t, n, d] as [t, b=1, n, d]
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        shard = ContextShard.here(packed.segments if thd else (query.shape[0] * self.cp,))
        keys, values = (shard.gather(x, 0, sum_grads=True) for x in (key, value))
        real = len(packed.lengths) if thd else 1  # a packed stream's padding tail attends nothing
        out = [self._lower_right(query[q], keys[kv], values[kv]) for q, kv in shard.blocks(real)]
        tail = query.shape[0] - sum(len(x) for x in out)
        out = torch.cat([*out, query.new_zeros(tail, query.shape[1], query.shape[2] * query.shape[3])])
        return out[:, 0] if thd else out

    def _lower_right(self, query, key, value):
        """Attention of q [sq, b, heads, d] over k, v [skv, b, groups, d], skv >= sq, query i seeing keys up
        to i + skv - sq; [sq, b, heads * d]."""
        raise NotImplementedError(f"{type(self).__name__} has no context parallelism")


class SdpaAttention(_CoreAttention):
    """torch's scaled_dot_product_attention (flash kernel on cpu and cuda), causal."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params: PackedSequences | None = None):
        if self.cp > 1:
            return self._context_parallel(query, key, value, packed_seq_params)
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        s, b = query.shape[:2]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        out = self._attend(q, k, v)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _attend(self, q, k, v, mask: CausalBias | None = None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                              enable_gqa=self.heads != self.groups)

    def _lower_right(self, query, key, value):
        # imported here: torch.nn.attention.bias imports TorchDynamo, which the runtime defers to first use
        from torch.nn.attention.bias import causal_lower_right

        sq, b = query.shape[:2]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        out = self._attend(q, k, v, causal_lower_right(sq, k.shape[2]))
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def _packed(self, query, key, value, packed: PackedSequences):
        """Each sequence of the stream [t, heads, d] attends to itself only: one causal call per sequence on
        its slice of the stream (a view); padding tokens get zeros."""
        parts = [packed.sequences(x) for x in (query, key, value)]  # one split each: a cheap backward
        out = [self._attend(*(p[i].unsqueeze(0).transpose(1, 2) for p in parts)).transpose(1, 2)[0]
               for i in range(len(packed.lengths))]
        padding = query.new_zeros(packed.padding, *query.shape[1:])
        return torch.cat([*out, padding]).view(query.shape[0], -1)  # one copy, in stream order


@dataclass(frozen=True)
class FusionAttentionCall:
    """One `torch_npu.npu_fusion_attention(query, key, value, head_num, input_layout, **kwargs)` call."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    head_num: int
    input_layout: str  # SBH | TND
    kwargs: dict

    def output(self, attention_out: torch.Tensor) -> torch.Tensor:
        """The kernel's output in megatron's layout: [s, b, heads * d] (SBH already is), or [t, heads * d]."""
        if self.input_layout == "TND":
            return attention_out.reshape(attention_out.shape[0], -1)
        return attention_out


def fusion_attention_call(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int,
                          scale: float, causal_mask: torch.Tensor,
                          packed: PackedSequences | None = None) -> FusionAttentionCall:
    """The npu_fusion_attention arguments for megatron's q/k/v (see the module docstring).

    SBH for [s, b, n, d] inputs: heads folded into the hidden dimension. TND for a packed stream [t, n, d]:
    `actual_seq_qlen`/`actual_seq_kvlen` are the cumulative sequence ends (without the leading 0; the last
    one is t), the padding tail counted as one more sequence. GQA needs nothing: the kernel takes fewer key
    and value heads than query heads. Causality: sparse mode 3 with the 2048 x 2048 upper-triangular mask
    (True = masked), applied within each TND sequence. keep_prob 1: no dropout."""
    if packed is None:
        q, k, v = (x.reshape(*x.shape[:2], -1) for x in (query, key, value))
        layout, lengths = "SBH", {}
    else:
        q, k, v = query, key, value
        ends = list(accumulate(packed.segments))
        layout, lengths = "TND", {"actual_seq_qlen": ends, "actual_seq_kvlen": list(ends)}
    kwargs = {"pse": None, "padding_mask": None, "atten_mask": causal_mask, "scale": scale, "keep_prob": 1.0,
              "pre_tockens": 2**31 - 1, "next_tockens": 0, "inner_precise": 0,
              "sparse_mode": NPU_CAUSAL_SPARSE_MODE, **lengths}
    return FusionAttentionCall(q, k, v, heads, layout, kwargs)


@functools.lru_cache(maxsize=4)
def npu_causal_mask(device: torch.device) -> torch.Tensor:
    """The compressed causal mask sparse mode 3 expects: True above the diagonal."""
    return torch.ones(NPU_CAUSAL_MASK_SIZE, NPU_CAUSAL_MASK_SIZE, dtype=torch.bool, device=device).triu(1)


class NpuFusionAttention(_CoreAttention):
    """torch_npu's flash attention (`npu_fusion_attention`), as MindSpeed runs it on Ascend."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params: PackedSequences | None = None):
        if self.cp > 1:
            return self._context_parallel(query, key, value, packed_seq_params)
        return self._call(query, key, value, packed_seq_params)

    def _lower_right(self, query, key, value):
        return self._call(query, key, value, None)  # sparse mode 3 is bottom-right aligned

    def _call(self, query, key, value, packed: PackedSequences | None):
        import torch_npu

        call = fusion_attention_call(query, key, value, self.heads, self.scale, npu_causal_mask(query.device), packed)
        out = torch_npu.npu_fusion_attention(call.query, call.key, call.value, call.head_num, call.input_layout,
                                             **call.kwargs)[0]
        return call.output(out)


def core_attention_class(kernel: str) -> type[torch.nn.Module]:
    """The module class megatron's layer spec builds for `kernel` (`device.ATTENTION` names them)."""
    if kernel == "te":
        return _te_attention()
    return {"sdpa": SdpaAttention, "npu-fusion": NpuFusionAttention, "local": DotProductAttention}[kernel]


@functools.cache
def _te_attention() -> type[torch.nn.Module]:
    """megatron-core's TEDotProductAttention, given device copies of a packed micro-batch's host cu_seqlens
    (TransformerEngine reads them on the device)."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    class TeAttention(TEDotProductAttention):
        def forward(self, query, *args, packed_seq_params: PackedSequences | None = None, **kwargs):
            if packed_seq_params is not None:
                cu_seqlens = packed_seq_params.cu_seqlens_q.to(query.device, non_blocking=True)
                packed_seq_params = dataclasses.replace(packed_seq_params, cu_seqlens_q=cu_seqlens,
                                                        cu_seqlens_kv=cu_seqlens)
            return super().forward(query, *args, packed_seq_params=packed_seq_params, **kwargs)

    return TeAttention
