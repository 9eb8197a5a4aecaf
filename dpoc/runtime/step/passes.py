"""One DPO step's two pipeline passes through megatron-core's schedules.

The reference pass (forward only; none for a reference-free loss) stores each micro-batch's reference
sequence log-probs on the micro-batch (the precompute pass runs it over the whole dataset once;
`precompute.py`); the policy pass then computes the loss against them and back-propagates. Both passes see
the same micro-batches in the same order, so pipeline, tensor, expert and data parallelism apply to both.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from dpoc.runtime.model import lora
from dpoc.runtime.model.context_parallel import ContextShard
from dpoc.runtime.step.data import MicroBatch, repeat_for_chunks
from dpoc.runtime.step.dpo import Objective, summed_logps


def holds_outputs() -> bool:
    """Whether this rank reports its replica's per-sequence outputs (log-probs, losses, metrics): the last
    pipeline stage's first tensor- and context-parallel rank."""
    return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_context_parallel_rank() == 0)


def reference_pass(chunks: list[torch.nn.Module], batches: list[MicroBatch],
                   sequence_logps: Callable = summed_logps) -> None:
    """Forward only: `batch.reference_logps` = each sequence's response log-probs (last stage), summed, or as
    the objective weights them (`Objective.sequence_logps`: LD-DPO). The reference never runs adapters: under
    LoRA it may be the policy's own chunks (`session.build_models`)."""
    with torch.no_grad(), lora.adapters_off(chunks):
        _run(chunks, batches, partial(_reference_step, sequence_logps), forward_only=True)


def policy_pass(chunks: list[torch.nn.Module], batches: list[MicroBatch], objective: Objective
                ) -> list[dict[str, torch.Tensor]]:
    """Forward and backward over all micro-batches; the per-micro-batch metrics (last stage only)."""
    return _run(chunks, batches, partial(_policy_step, objective), forward_only=False)


def _run(chunks, batches, step_fn, forward_only: bool):
    return get_forward_backward_func()(
        forward_step_func=step_fn,
        data_iterator=repeat_for_chunks(batches, len(chunks)),
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(batches),
        seq_length=max(b.tokens.shape[1] for b in batches),
        micro_batch_size=batches[0].tokens.shape[0],
        forward_only=forward_only,
    )


def _forward(data_iterator, model):
    """One micro-batch through the model; the closure's `rows` turns the last stage's per-token output back
    into rows of whole sequences (with context parallelism: gathered from the CP group)."""
    batch = next(data_iterator)
    inputs = (batch.tokens, batch.position_ids, batch.targets)
    shard = None
    if parallel_state.get_context_parallel_world_size() > 1:  # this rank's chunks of every sequence
        shard = ContextShard.here(batch.packed.segments if batch.packed is not None else (batch.tokens.shape[1],))
        inputs = tuple(shard.local(x, 1) for x in inputs)
    tokens, positions, targets = inputs
    # with labels, GPTModel's last stage returns the per-token cross entropy [b, s] computed by
    # megatron-core's vocab-parallel cross entropy; earlier stages return hidden states
    # (a packed micro-batch also passes its sequence boundaries, megatron's thd format)
    out = model(tokens, positions, None, labels=targets, packed_seq_params=batch.packed)

    def rows(token_values):
        if shard is not None:
            token_values = shard.gather(token_values, 1, sum_grads=False)
        return batch.per_sequence(token_values)

    return batch, out, rows


def _reference_step(sequence_logps: Callable, data_iterator, model):
    batch, out, rows = _forward(data_iterator, model)

    def store(token_nll):
        batch.reference_logps = sequence_logps(-rows(token_nll), batch.mask).detach()
        return token_nll.sum() * 0, {}

    return out, store


def _policy_step(objective: Objective, data_iterator, model):
    batch, out, rows = _forward(data_iterator, model)

    def loss(token_nll):
        return objective.loss_from_tokens(rows(token_nll), batch.mask, batch.reference_logps,
                                          batch.step_mean_pairs, batch.desirable)

    return out, loss
