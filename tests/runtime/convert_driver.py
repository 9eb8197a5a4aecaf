"""Run by test_runtime_convert.py in a fresh process (the converter installs the CPU bridge process-wide).

usage: python -m tests.runtime.convert_driver COMMANDS.json
COMMANDS.json: a list of steps, each `["cli", ARGV...]` (`dpoc ARGV`, exit code recorded),
`["tracked", ARGV...]` (the same, recording the order in which the converter reads and writes tensors), or
`["training-checkpoint", CONVERTED, SAVE_DIR, ITERATION]`: the model loaded from a converted checkpoint and
saved the way a training run saves (model keys next to optimizer and RNG entries, under iter_NNNNNNN/ with
latest_checkpointed_iteration.txt), or `["checkpoint-problems", CONVERTED, CHECKPOINT, FLAG...]`: the
runtime's check of CHECKPOINT against a model of CONVERTED's architecture changed by FLAGs. Prints the
results as JSON.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from dpoc.cli import main as cli
from dpoc.contract.hf_config import architecture, model_flags
from dpoc.contract.megatron_args import parse
from dpoc.runtime.model import device as devices
from dpoc.runtime.model.gpt import build_chunks, transformer_config
from dpoc.runtime.step.session import initialize_parallel
from dpoc.runtime.weights import weight_sources


def model_from(converted: str, *overrides: str):
    """megatron.args (model flags from the converted checkpoint's recorded config.json, then `overrides`), the
    device, and a one-process group with its parallel state."""
    config = weight_sources.common_state(converted)[weight_sources.COMMON_KEY]["hf_config"]
    flags = [f"{f}={v}" if v is not True else f for f, v in model_flags(architecture(config, converted))]
    args = parse([*flags, *overrides, "--dpoc-device=cpu", "--distributed-backend=gloo"], require_job=False)
    device = devices.select("cpu", "gloo")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    return args, device


def close() -> None:
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def training_checkpoint(converted: str, save: str, iteration: int) -> int:
    args, device = model_from(converted)
    with devices.running_on(device):
        initialize_parallel(args)
        model_config = transformer_config(args, device)
        chunks = build_chunks(model_config, args)
        source = weight_sources.WeightSource("checkpoint", converted, "--load")
        weight_sources.load(source, chunks, model_config, args)
        embedding = chunks[0].embedding.word_embeddings.weight
        state = {
            "model": chunks[0].sharded_state_dict(),
            "optimizer": {"exp_avg": ShardedTensor.from_rank_offsets(
                "optimizer.state.exp_avg.embedding.word_embeddings.weight", torch.ones_like(embedding) * 7)},
            "rng_state": ShardedObject("rng_state", {"seed": 1}, (1,), (0,), replica_id=0),
            "iteration": iteration,
        }
        folder = Path(save) / f"iter_{iteration:07d}"
        folder.mkdir(parents=True)
        dist_checkpointing.save(state, str(folder))
        (Path(save) / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    close()
    return 0


def checkpoint_problems(converted: str, checkpoint: str, *overrides: str) -> list[str]:
    """What the runtime says, after building the model of `overrides`, about loading `checkpoint` into it."""
    args, device = model_from(converted, *overrides)
    with devices.running_on(device):
        initialize_parallel(args)
        chunks = build_chunks(transformer_config(args, device), args)
        problems = weight_sources.checkpoint_problems(chunks, checkpoint)
    close()
    return [str(p) for p in problems]


def tracked(argv: list[str]) -> dict:
    """`dpoc ARGV` with every tensor read (R) and every tensor written (W) recorded in order."""
    from torch.distributed.checkpoint import filesystem

    from dpoc.runtime.weights import converter as convert

    events = []

    def record(function, event):
        def wrapper(*args, **kwargs):
            events.append(event)
            return function(*args, **kwargs)
        return wrapper

    convert.read_sharded = record(convert.read_sharded, "R")
    convert._Reader.read = record(convert._Reader.read, "R")
    filesystem._write_item = record(filesystem._write_item, "W")
    convert.StreamingSafetensors.write = record(convert.StreamingSafetensors.write, "W")
    return {"code": cli(argv), "events": "".join(events)}


def main(commands_file: str) -> None:
    codes = []
    for step in json.loads(Path(commands_file).read_text()):
        if step[0] == "cli":
            codes.append(cli(step[1:]))
        elif step[0] == "tracked":
            codes.append(tracked(step[1:]))
        elif step[0] == "checkpoint-problems":
            codes.append(checkpoint_problems(*step[1:]))
        else:
            codes.append(training_checkpoint(step[1], step[2], int(step[3])))
    print(json.dumps(codes))


if __name__ == "__main__":
    main(*sys.argv[1:])
