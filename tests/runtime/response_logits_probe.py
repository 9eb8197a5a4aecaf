"""Run in a fresh process by test_runtime_model.py: the runtime's model (`ResponseLogitsGPTModel`, which
projects only the response positions through the LM head) against the same weights' full logits, on a
padded and a packed micro-batch. Prints, as one JSON line per batch kind, the largest differences of the
per-token losses (at the predicted positions; the others must be exactly zero) and of every parameter's
gradient under a weighted sum of those losses.

    python tests/runtime/response_logits_probe.py ARGS_FILE
"""

import json
import sys

import torch
import torch.nn.functional as F

from dpoc.contract import megatron_args
from dpoc.runtime.model import seeded_init
from dpoc.runtime.model.gpt import build_chunks, transformer_config
from dpoc.runtime.step.data import IGNORE_INDEX, Batching, PairwiseDataset, rank_micro_batches
from tests.runtime.synthetic import one_process


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    return grads


def compare(model, batch) -> dict:
    keep = batch.targets != IGNORE_INDEX
    weights = torch.linspace(0.5, 1.5, int(keep.sum()))  # any fixed weighting: every kept loss matters
    losses = model(batch.tokens, batch.position_ids, None, labels=batch.targets, packed_seq_params=batch.packed)
    (losses[keep] * weights).sum().backward()
    ours = gradients(model)
    logits = model(batch.tokens, batch.position_ids, None, packed_seq_params=batch.packed)  # [b, s, V], all
    full = F.cross_entropy(logits[keep], batch.targets[keep], reduction="none")
    (full * weights).sum().backward()
    theirs = gradients(model)
    return {"kept": int(keep.sum()), "positions": keep.numel(),
            "loss": float((losses[keep] - full).abs().max() / full.abs().max()),
            "skipped_nonzero": int((losses[~keep] != 0).sum()),
            "grad": max(float((ours[n] - theirs[n]).abs().max() / theirs[n].abs().max().clamp(min=1e-30))
                        for n in theirs)}


def main() -> None:
    args = megatron_args.parse([f"@{sys.argv[1]}"])
    with one_process(args.seed) as device:
        config = transformer_config(args, device)
        (model,) = build_chunks(config, args)
        seeded_init.initialize([model], config, args.seed)
        dataset = PairwiseDataset(args.data_path, args.seq_length)
        result = {}
        for packing in (False, True):
            args.dpoc_packing = packing
            batch = rank_micro_batches(dataset, 0, Batching.from_args(args, same_length=False), 0, 1,
                                       device.current())[0]
            result["packed" if packing else "padded"] = compare(model, batch)
    print(json.dumps(result))


main()
