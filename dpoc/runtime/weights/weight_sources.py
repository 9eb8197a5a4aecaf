"""Where the policy and the frozen reference start, decided from megatron.args and checked before the first step.

`--dpoc-init` says it: `random` (a seeded init; only then), `hf` (`--dpoc-hf-weights`, read straight into
the sharded model), `converted` (`--load` with `--finetune`: a distributed checkpoint). `--ref-model` names
the reference's weights — a Hugging Face directory, a distributed checkpoint, or a training save directory
(its latest iteration); without it the reference starts from the policy's initial weights. A path that is
missing, unreadable or of another architecture is refused with one line naming the flag or file, the field,
and both values; nothing here starts from random weights unless the args say `random`.

What a source is and its identity (kind, path, content hash) live in the torch-free `weight_identity`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from dpoc.contract import hf_config, megatron_args
from dpoc.contract.architecture import Architecture
from dpoc.contract.errors import DpocError, Problem
from dpoc.runtime.model import device as devices
from dpoc.runtime.model import seeded_init
from dpoc.runtime.weights import hf_weights
from dpoc.runtime.weights.sharded import sharded_tensors
from dpoc.runtime.weights.weight_identity import WeightSource, open_source

COMMON_KEY = "dpoc_weights"  # the converter's record in a checkpoint's common state: source, config, hash


def sources(args: argparse.Namespace, args_file: str) -> tuple[WeightSource, WeightSource]:
    """The policy's and the reference's initial weights, checked (exit 2 with every problem otherwise)."""
    init, problems = args.dpoc_init, []

    def given(flag: str, value: object) -> None:
        if value:
            problems.append(Problem(args_file, flag, f"is given, but --dpoc-init is {init}: the policy starts from "
                                    f"{_STARTS[init]} (valid: drop {flag}, or another --dpoc-init)"))

    if init is None:
        raise DpocError([Problem(args_file, "--dpoc-init", "missing: the runtime never guesses where the weights "
                                 "come from (valid: hf with --dpoc-hf-weights, converted with --load and "
                                 "--finetune, random)")])
    resuming = megatron_args.resuming(args)  # --load alone: checkpoint.py restores the policy from it
    if init == "random":
        if not resuming:
            given("--load", args.load)
        given("--dpoc-hf-weights", args.dpoc_hf_weights)
        given("--ref-model", args.ref_model)
        policy = WeightSource("random", None, "--dpoc-init")
    elif init == "hf":
        if not resuming:
            given("--load", args.load)
        if not args.dpoc_hf_weights:
            problems.append(Problem(args_file, "--dpoc-hf-weights", "missing: --dpoc-init hf reads the policy from "
                                    "this Hugging Face directory"))
        policy = open_source(args.dpoc_hf_weights, "--dpoc-hf-weights", args_file, problems, kinds=("hf",))
    elif resuming:  # the converted initial weights only matter as the reference: --ref-model names them
        given("--dpoc-hf-weights", args.dpoc_hf_weights)
        policy = WeightSource("resume", args.load, "--load")
        if not args.ref_model and args.dpoc_reference != "none":
            problems.append(Problem(args_file, "--ref-model", "missing: a resumed run's reference is its initial "
                                    "weights, which --load (the save directory) no longer names"))
    else:
        given("--dpoc-hf-weights", args.dpoc_hf_weights)
        if not args.load:
            problems.append(Problem(args_file, "--load", "missing: --dpoc-init converted reads the policy from this "
                                    "distributed checkpoint (with --finetune)"))
        policy = open_source(args.load, "--load", args_file, problems, kinds=("checkpoint",))
    reference = open_source(args.ref_model, "--ref-model", args_file, problems) if args.ref_model else policy
    base = _lora_base_flag(args, args_file, policy, resuming, problems)
    if problems:
        raise DpocError(problems)
    if resuming:  # the policy's initial weights are not read: the checkpoint replaces them (its own checks)
        policy = WeightSource("resume", args.load, "--load")
    for source in dict.fromkeys(s for s in (policy, reference, base) if s is not None):
        problems += architecture_problems(source, args, args_file)
    if problems:
        raise DpocError(problems)
    return policy, reference


def _lora_base_flag(args: argparse.Namespace, args_file: str, policy: WeightSource, resuming: bool,
                    problems: list[Problem]) -> WeightSource | None:
    """`--dpoc-lora-base`, the converted base of a LoRA run: required to resume one (`--load` then names the save
    directory, and `--ref-model` may be another model), at a fresh start the policy's `--load`."""
    if not args.dpoc_lora_base:
        if args.lora_r is not None and args.dpoc_init == "converted" and resuming:
            problems.append(Problem(args_file, "--dpoc-lora-base", "missing: a resumed LoRA run on converted weights "
                                    "reads its frozen base from it (the start's --load; --load now names the save "
                                    "directory)"))
        return None
    if args.lora_r is None or args.dpoc_init != "converted":
        problems.append(Problem(args_file, "--dpoc-lora-base", f"is given, but it names the frozen base of LoRA "
                                f"(--lora-r) on converted weights only (got --dpoc-init {args.dpoc_init}"
                                f"{'' if args.lora_r else ', no --lora-r'}; valid: drop it)"))
        return None
    base = open_source(args.dpoc_lora_base, "--dpoc-lora-base", args_file, problems, kinds=("checkpoint",))
    if not resuming and base.kind == "checkpoint" and policy.kind == "checkpoint" and base.path != policy.path:
        problems.append(Problem(args_file, "--dpoc-lora-base", f"{args.dpoc_lora_base}, but --load starts the policy "
                                f"from {args.load}: the base is the policy's initial weights (valid: the same path)"))
    return base if base.kind == "checkpoint" else None


def lora_base(args: argparse.Namespace, policy: WeightSource) -> WeightSource:
    """LoRA: the frozen base, read at every start (a LoRA checkpoint holds only the adapters): the policy's
    initial weights; on a resume, what --dpoc-init names (converted: --dpoc-lora-base, checked by `sources`)."""
    if policy.kind != "resume":
        return policy
    if args.dpoc_init == "random":
        return WeightSource("random", None, "--dpoc-init")
    if args.dpoc_init == "hf":
        return WeightSource("hf", args.dpoc_hf_weights, "--dpoc-hf-weights")
    return open_source(args.dpoc_lora_base, "--dpoc-lora-base", "", [], kinds=("checkpoint",))


def same_weights(a: WeightSource, b: WeightSource) -> bool:
    return (a.kind, a.path) == (b.kind, b.path)


_STARTS = {"random": "a seeded random init", "hf": "--dpoc-hf-weights", "converted": "--load"}


def architecture_problems(source: WeightSource, args: argparse.Namespace, args_file: str) -> list[Problem]:
    """Hugging Face weights: config.json against megatron.args, then every tensor's presence and shape. A
    checkpoint the converter wrote: its recorded config.json against megatron.args (tensor shapes are
    checked against the built model, see `checkpoint_problems`)."""
    if source.kind == "hf":
        problems = hf_config.mismatches(args, source.path, args_file, source.flag)
        if not problems:
            problems = hf_weights.HfWeights(source.path).problems(_architecture(args))
        return problems
    if source.kind == "checkpoint":
        record = common_state(source.path).get(COMMON_KEY)
        if record and "hf_config" in record:
            shown = f"{source.path}/common.pt ({COMMON_KEY}.hf_config)"
            return hf_config.config_mismatches(record["hf_config"], shown, args, args_file)
    return []


def _architecture(args: argparse.Namespace) -> Architecture:
    return Architecture.of(hf_config.architecture_from_args(args))


def common_state(checkpoint: str) -> dict[str, Any]:
    path = Path(checkpoint) / "common.pt"
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}


def checkpoint_problems(chunks: list, checkpoint: str) -> list[Problem]:
    """Every weight of these chunks that the checkpoint lacks or holds in another global shape."""
    stored = dist_checkpointing.load_tensors_metadata(checkpoint)
    out = []
    for chunk in chunks:
        for sh in sharded_tensors(chunk.sharded_state_dict()):
            if sh.key not in stored:
                out.append(Problem(checkpoint, sh.key,
                                   f"missing (the model needs global shape {list(sh.global_shape)})"))
            elif tuple(stored[sh.key].global_shape) != tuple(sh.global_shape):
                out.append(Problem(checkpoint, sh.key, f"global shape {list(stored[sh.key].global_shape)} in the "
                                   f"checkpoint, but the model needs {list(sh.global_shape)}"))
    return list(dict.fromkeys(out))


def load(source: WeightSource, chunks: list, config, args: argparse.Namespace) -> None:
    """Fill `chunks` (this rank's) from `source`. Collective for checkpoints: every rank calls it alike."""
    if source.kind == "random":
        seeded_init.initialize(chunks, config, args.seed)
    elif source.kind == "hf":
        hf_weights.load(chunks, hf_weights.HfWeights(source.path), _architecture(args))
    else:
        problems = problems_everywhere(checkpoint_problems(chunks, source.path), args.dpoc_device)
        if problems:
            raise DpocError(problems)
        template = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
        state = dist_checkpointing.load(template, source.path)
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[f"model{i}"])


def problems_everywhere(local: list[Problem], device_kind: str) -> list[Problem]:
    """All ranks agree whether to stop: a rank's problems stop every rank (ranks without problems exit 2 too).
    The vote is on the group's device (an hccl/nccl group has no CPU backend)."""
    flag = torch.tensor([len(local)], dtype=torch.int32, device=devices.current(device_kind))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and not local:
        raise SystemExit(2)
    return local
