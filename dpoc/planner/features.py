"""The memory-saving features a target turns on, as the planner's memory model counts them.

Each term was read from the source of the feature (never fitted to a published number):
- `reuse_fp32_param` (MindSpeed `optimizer/distrib_optimizer.py`, `reuse_fp32_param_distrib_optimizer_init`):
  the fp32 master copy of the rank's optimizer shard is not allocated; it is rebuilt in place from the bf16
  parameter buffer's slice of that shard plus a bf16 residual buffer of the shard's size. So the shard's
  state is residual 2 B + Adam m, v 8 B instead of master 4 B + m, v 8 B: 2 B less per parameter of the
  shard (2 B x params / dp with the distributed optimizer, MindSpeed's feature doc says the same).
- `swap_attention` (a layout knob, `parallelism.swap_attention`, only MindSpeed-RL renders it; MindSpeed
  `core/memory/swap_attention/prefetch.py`, `adaptor.py`): the tensors that the `input_norm,
  self_attention, post_attention_norm` modules save for backward are copied to pinned host memory during the
  forward and their device storage freed once the next layer starts; the backward fetches a layer's back as
  that layer's backward begins. Without recompute every layer of the stage swaps, so the device holds one
  layer of them at a time (a transient). Views are never swapped, so the fused QKV projection's output
  stays: value (and with qk-norm the key's norm input) are views of it.
- `flash_stats`: the fp32 softmax statistics the attention kernel keeps per head and token for backward:
  `npu_fusion_attention` keeps softmax_max and softmax_sum, each [b, n, s, 8] fp32 (16 values; MindSpeed's
  `npu_ring_attention_update` doc gives the shape), flash attention on CUDA and torch's SDPA one log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpoc.contract.plan import Layout, Training

# fp32 statistics per head and token the fused attention kernel saves, per device
FLASH_STATS = {"npu": 16, "cuda": 1, "cpu": 1}
# how a target pads its micro-batches (`lengths`): the dpoc runtime sorts each global batch and pads every
# micro-batch to its own longest pair; MindSpeed-RL pads the whole global batch to its longest sequence
SORT_AND_CUT, GLOBAL_BATCH = "sort-and-cut", "global-batch"
# every sequence padded to seq_length (a static-padding run: its training has dynamic_padding off, so the
# length models hold every micro-batch at seq_length whatever the batching says)
PADDED_TO_SEQ_LENGTH = "padded-to-seq-length"


@dataclass(frozen=True)
class MemoryFeatures:
    reuse_fp32_param: bool = False
    flash_stats: int = 1

    def reuses_fp32_param(self, layout: Layout, training: Training) -> bool:
        """Where a target that has the feature turns it on: bf16 with the distributed optimizer (MindSpeed-RL's
        guide configs; the MindSpeed-RL target renders exactly this)."""
        return self.reuse_fp32_param and layout.distributed_optimizer and training.precision == "bf16"



def kernel_features(device: str) -> MemoryFeatures:
    """What every target has on `device`: its attention kernel's saved statistics, no optional feature."""
    return MemoryFeatures(flash_stats=FLASH_STATS[device])


@dataclass(frozen=True)
class Traits:
    """What the planner models of the target a plan is for: its batching, its memory features, and where its
    LM head runs: `response_head` when the head (and the cross entropy) runs only on the positions that
    predict a response token, as the dpoc runtime's does (`head.head_fraction`); else on every position of
    the row, as MindSpeed-RL's (MindSpeed-LLM's `DPOTrainer.loss_func` takes the whole [2b, s, vocab / tp]
    logits of policy and reference and only then slices out the response's log-probs)."""

    target: str
    batching: str
    features: MemoryFeatures
    response_head: bool


NO_FEATURES = MemoryFeatures()
DPOC_CPU = Traits("dpoc", SORT_AND_CUT, NO_FEATURES, response_head=True)  # unless told the target
