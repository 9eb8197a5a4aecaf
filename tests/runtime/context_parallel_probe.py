"""Run under torchrun by test_runtime_context_parallel.py (2 processes, gloo, one CP group of 2): the SDPA
and npu_fusion_attention core attentions (the latter on its CPU rendering, npu_kernels.py) on each rank's
load-balanced share of q/k/v, padded rows and a packed stream, against SDPA over the whole sequences in
this process; forward and every q/k/v gradient. Rank 0 prints one JSON line of the largest absolute
differences.

    torchrun --nproc-per-node 2 tests/runtime/context_parallel_probe.py
"""

import json
import sys
import types

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType

from dpoc.runtime.model.attention import NpuFusionAttention, PackedSequences, SdpaAttention
from dpoc.runtime.model.context_parallel import ContextShard
from tests.runtime import npu_kernels

HEADS, GROUPS, HEAD_DIM = 4, 2, 8
# npu_fusion_attention is the documented kernel's CPU rendering (npu_kernels.py) standing in for torch_npu
sys.modules["torch_npu"] = types.SimpleNamespace(npu_fusion_attention=npu_kernels.npu_fusion_attention)
KERNELS = {"sdpa": SdpaAttention, "npu-fusion": NpuFusionAttention}


def attention(cp: int, kernel: type = SdpaAttention):
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS,
                               num_query_groups=GROUPS, kv_channels=HEAD_DIM, context_parallel_size=cp)
    return kernel(config, 1, AttnMaskType.causal, "self")


def compare(shape: tuple[int, ...], seq_dim: int, packed: PackedSequences | None, kernel: type) -> dict[str, float]:
    """Whole tensors made alike on every rank; each rank attends its share; outputs gathered, one loss."""
    g = torch.Generator().manual_seed(7)
    whole = [torch.randn(*shape[:-1], heads, HEAD_DIM, generator=g) for heads in (HEADS, GROUPS, GROUPS)]
    weight = torch.randn(*shape[:-1], HEADS * HEAD_DIM, generator=g)
    full = [x.clone().requires_grad_() for x in whole]
    expected = attention(1)(*full, None, packed_seq_params=packed)
    (expected * weight).sum().backward()

    segments = packed.segments if packed is not None else (shape[seq_dim],)
    shard = ContextShard.here(segments)
    mine = [shard.local(x, seq_dim).requires_grad_() for x in whole]
    out = shard.gather(attention(2, kernel)(*mine, None, packed_seq_params=packed), seq_dim, sum_grads=False)
    (out * weight).sum().backward()
    errors = {"out": (out - expected).abs().max().item()}
    for name, local, reference in zip("qkv", mine, full, strict=True):
        errors[f"d{name}"] = (local.grad - shard.local(reference.grad, seq_dim)).abs().max().item()
    return errors


def main() -> None:
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(context_parallel_size=2)
    result = {"rank0_positions": ContextShard.here((8,)).index.tolist()}
    for name, kernel in KERNELS.items():
        result[name] = {
            "padded": compare((24, 3, 0), 0, None, kernel),  # [s=24, b=3, heads, d]: 4 chunks of 6
            # a stream of sequences 8, 12 and 4 long, then 4 padding tokens (each a multiple of 2·cp)
            "packed": compare((28, 0), 0, PackedSequences.of((8, 12, 4), 4), kernel)}
    if dist.get_rank() == 0:
        print(json.dumps(result))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


main()
