"""Context parallelism (`--context-parallel-size`): each rank of the CP group holds part of every sequence.

The split is megatron-core's load-balanced one (`get_batch_on_this_cp_rank`): a sequence of length L
(a multiple of 2·cp) is cut into 2·cp chunks and rank r keeps chunks r and 2·cp−1−r, so under causal
masking every rank does the same attention work. A packed stream is split per sequence (each of its
segments, the padding tail included, a multiple of 2·cp), as TransformerEngine splits THD batches;
megatron-core's rotary embedding already picks the true positions for both forms (`rope_utils`).

Attention gathers the group's keys and values (`gather`, summing their gradients back: a reduce-scatter)
and attends each chunk of this rank's queries to its sequence's keys up to the chunk's end, causal aligned
to the bottom right (`blocks`; `attention.py`). The
per-token losses are gathered the same way before the per-sequence sums, so every CP rank computes the
same loss; each rank's backward then keeps only its own tokens' share (megatron's schedule multiplies
the loss by cp, and the gradients are averaged over dp·cp).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def padding_multiple(tp: int, cp: int) -> int:
    """What a micro-batch's length (and, packed, every sequence's) is rounded to: 2·cp for the split, and
    each rank's share a multiple of tp for sequence parallelism."""
    return tp * cp * 2 if cp > 1 else tp


def chunk_positions(length: int, cp: int, rank: int) -> torch.Tensor:
    """The positions of a sequence of `length` tokens that CP rank `rank` holds: chunks rank, 2·cp−1−rank."""
    if length % (2 * cp):
        raise ValueError(f"a sequence of {length} tokens cannot be split into 2·cp = {2 * cp} chunks")
    chunk = length // (2 * cp)
    first, second = rank * chunk, (2 * cp - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


@dataclass(frozen=True)
class ContextShard:
    """Where this rank's tokens lie in a stream made of `segments` (one segment per unpacked row length, or
    the sequences of a packed stream)."""

    segments: tuple[int, ...]
    cp: int
    rank: int

    @classmethod
    def here(cls, segments: tuple[int, ...]) -> ContextShard:
        return cls(tuple(segments), parallel_state.get_context_parallel_world_size(),
                   parallel_state.get_context_parallel_rank())

    def _positions(self, rank: int) -> list[torch.Tensor]:
        """Per segment, its positions on `rank`, counted within the segment."""
        return [chunk_positions(n, self.cp, rank) for n in self.segments]

    @cached_property
    def index(self) -> torch.Tensor:
        """This rank's tokens as indices into the whole stream."""
        return self._stream_index(self.rank)

    @cached_property
    def order(self) -> torch.Tensor:
        """The permutation that puts the ranks' pieces, laid end to end in rank order, in stream order."""
        return torch.cat([self._stream_index(r) for r in range(self.cp)]).argsort()

    def _stream_index(self, rank: int) -> torch.Tensor:
        starts = torch.tensor([0, *self.segments[:-1]]).cumsum(0).tolist()
        return torch.cat([start + p for start, p in zip(starts, self._positions(rank), strict=True)])

    def blocks(self, segments: int) -> list[tuple[slice, slice]]:
        """Causal attention of the first `segments` segments, block by block: per segment, per chunk this rank
        holds (in its order), the chunk's place in this rank's share and the keys it attends in the whole
        stream (its segment's start up to the chunk's end)."""
        out, local, start = [], 0, 0
        for n in self.segments[:segments]:
            chunk = n // (2 * self.cp)
            for k in (self.rank, 2 * self.cp - 1 - self.rank):
                out.append((slice(local, local + chunk), slice(start, start + (k + 1) * chunk)))
                local += chunk
            start += n
        return out

    def local(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's share of a whole tensor, along `dim`."""
        return x.index_select(dim, self.index.to(x.device))

    def gather(self, x: torch.Tensor, dim: int, sum_grads: bool) -> torch.Tensor:
        """The whole stream along `dim` from every rank's share (differentiable). `sum_grads`: the ranks use
        the result differently (keys and values), so each share's gradient is the group's sum; otherwise
        every rank computes the same function of it (the loss) and keeps its own share's gradient."""
        return _Gather.apply(x, dim, self, sum_grads)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, shard: ContextShard, sum_grads: bool):
        ctx.dim, ctx.shard, ctx.sum_grads, ctx.local = dim, shard, sum_grads, x.shape[dim]
        pieces = [torch.empty_like(x) for _ in range(shard.cp)]
        dist.all_gather(pieces, x.contiguous(), group=parallel_state.get_context_parallel_group())
        return torch.cat(pieces, dim).index_select(dim, shard.order.to(x.device))

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if ctx.sum_grads:
            grad = grad.clone()
            dist.all_reduce(grad, group=parallel_state.get_context_parallel_group())
        return grad.index_select(ctx.dim, ctx.shard.index.to(grad.device)), None, None, None
