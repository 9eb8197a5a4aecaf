"""A tiny pairwise dataset with a learnable preference, and tiny megatron.args files, for runtime tests.

Chosen responses repeat the prompt's tokens shifted by one; rejected responses are random tokens. A
model that learns "continue with prompt token + 1" prefers chosen, so reward accuracy can rise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from dpoc.contract.megatron_args import format_args
from dpoc.data.pairwise import FIELDS as PARTS
from dpoc.data.pairwise import dataset_prefix as part_prefix
from dpoc.runtime.step.data import IGNORE_INDEX

VOCAB = 128


def _pairs(pairs: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(prompt, chosen response, rejected response) token ids of each pair."""
    rng = np.random.RandomState(seed)
    for _ in range(pairs):
        prompt = rng.randint(2, VOCAB - 1, size=rng.randint(4, 12))
        length = rng.randint(6, 24)
        chosen = (np.resize(prompt, length) + 1) % VOCAB
        yield prompt, chosen, rng.randint(2, VOCAB, size=rng.randint(6, 24))


def write_pairs(prefix: Path, pairs: int, seed: int = 0) -> str:
    """Write `pairs` pairs under `prefix` in the four indexed datasets the runtime reads."""
    builders = {p: IndexedDatasetBuilder(part_prefix(str(prefix), p) + ".bin", dtype=np.int32) for p in PARTS}
    for prompt, chosen, rejected in _pairs(pairs, seed):
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            ids = np.concatenate([prompt, response])
            labels = ids.copy()
            labels[: len(prompt)] = IGNORE_INDEX
            for part, values in ((f"{side}_input_ids", ids), (f"{side}_labels", labels)):
                builders[part].add_item(torch.from_numpy(values.astype(np.int32)))
                builders[part].end_document()
    for part, builder in builders.items():
        builder.finalize(part_prefix(str(prefix), part) + ".idx")
    return str(prefix)


def pair_stats(pairs: int, seq_length: int, seed: int = 0) -> dict:
    """The `_stats.json` that `dpoc preprocess` would write for `write_pairs(prefix, pairs, seed)` (its
    counts and histograms, by the preprocessor's own `Stats`), for the planner's `parse_stats`."""
    from dpoc.data.config import PreprocessConfig
    from dpoc.data.encode import EncodedPair, Outcome
    from dpoc.data.stats import Stats

    config = PreprocessConfig(input="synthetic", tokenizer="synthetic", output_prefix="synthetic",
                              seq_length=seq_length)
    stats = Stats(config, config)
    for i, (prompt, chosen, rejected) in enumerate(_pairs(pairs, seed)):
        encoded = EncodedPair(len(prompt), np.concatenate([prompt, chosen]), np.concatenate([prompt, rejected]),
                              False)
        stats.add(Outcome(f"pair {i}", pair=encoded))
    return stats.to_json()


def model_flags(moe: bool = False, layers: int = 4) -> list[tuple[str, object]]:
    """A tiny Qwen3 (dense or MoE): GQA, RoPE, RMSNorm, SwiGLU, q/k norm, untied embeddings."""
    flags = [
        ("--num-layers", layers), ("--hidden-size", 64), ("--ffn-hidden-size", 128),
        ("--num-attention-heads", 4), ("--group-query-attention", True), ("--num-query-groups", 2),
        ("--kv-channels", 16), ("--max-position-embeddings", 256), ("--position-embedding-type", "rope"),
        ("--rotary-base", 1000000), ("--normalization", "RMSNorm"), ("--norm-epsilon", 1e-6),
        ("--swiglu", True), ("--disable-bias-linear", True), ("--qk-layernorm", True),
        ("--untie-embeddings-and-output-weights", True), ("--padded-vocab-size", VOCAB),
    ]
    if moe:
        flags += [("--num-experts", 4), ("--moe-router-topk", 2), ("--moe-ffn-hidden-size", 32),
                  ("--moe-aux-loss-coeff", 0.001), ("--moe-token-dispatcher-type", "alltoall")]
    return flags


def write_args(path: Path, data_path: str, run_dir: Path, *, layout: list[tuple[str, object]] = (),
               moe: bool = False, steps: int = 3, global_batch: int = 8, micro_batch: int = 2,
               lr: float = 1e-3, distributed_optimizer: bool = True, extra: list[tuple[str, object]] = (),
               init: list[tuple[str, object]] = (("--dpoc-init", "random"),),
               model: list[tuple[str, object]] | None = None) -> Path:
    """The flags the compiler emits for a CPU recipe (fp32, gloo), in the compiler's own format; `init` says
    where the weights come from (default: the seeded random init); `model` replaces the tiny model's flags."""
    flags = [
        *(model if model is not None else model_flags(moe)),
        ("--dpoc-device", "cpu"), ("--distributed-backend", "gloo"),
        ("--stage", "dpo"), ("--is-pairwise-dataset", True), ("--dpo-loss-type", "sigmoid"),
        ("--dpo-beta", 0.1), *layout, *[("--use-distributed-optimizer", True)] * distributed_optimizer,
        ("--micro-batch-size", micro_batch), ("--global-batch-size", global_batch), ("--seq-length", 64),
        ("--train-iters", steps), ("--lr", lr), ("--lr-decay-style", "constant"), ("--clip-grad", 1.0),
        ("--seed", 1234), ("--no-pad-to-seq-lengths", True), ("--data-path", data_path),
        ("--dpoc-run-dir", str(run_dir)), ("--dpoc-plan-hash", "test"), *init, *extra,
    ]
    path.write_text(format_args(flags))
    return path


@contextlib.contextmanager
def one_process(seed: int):
    """A one-process gloo world with megatron's parallel state, on the CPU device, for the probes."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from dpoc.runtime.model import device as devices

    device = devices.select("cpu", "gloo")
    devices.fill_megatron_gaps()
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    try:
        with devices.running_on(device):
            yield device
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
