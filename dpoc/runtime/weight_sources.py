"""Where the policy and the frozen reference start, decided from megatron.args and checked before the first step.

`--dpoc-init` says it: `random` (a seeded init; only then), `hf` (`--dpoc-hf-weights`, read straight into
the sharded model), `converted` (`--load` with `--finetune`: a distributed checkpoint). `--ref-model` names
the reference's weights — a Hugging Face directory, a distributed checkpoint, or a training save directory
(its latest iteration); without it the reference starts from the policy's initial weights. A path that is
missing, unreadable or of another architecture is refused with one line naming the flag or file, the field,
and both values; nothing here starts from random weights unless the args say `random`.

`describe_weights` gives a source's identity (kind, path, content hash): training checkpoints record the
reference's, so a resumed run can tell that its reference is still the same weights.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from dpoc import hf_config
from dpoc.errors import DpocError, Problem
from dpoc.runtime import hf_weights, seeded_init
from dpoc.runtime.sharded import sharded_tensors
from dpoc.runtime.weight_map import Arch

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_MARKER = "metadata.json"  # megatron-core writes it last: the distributed checkpoint is complete
COMMON_KEY = "dpoc_weights"  # the converter's record in a checkpoint's common state: source, config, hash
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16


@dataclass(frozen=True)
class WeightSource:
    kind: str  # random | hf | checkpoint
    path: str | None  # the directory to read (a checkpoint's iteration folder), None for random
    flag: str  # the megatron.args flag that named it

    def describe(self) -> str:
        return "seeded random init" if self.kind == "random" else f"{self.kind} {self.path}"


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
    if args.load and not args.finetune:
        raise DpocError([Problem(args_file, "--load", f"{args.load} without --finetune would resume training, which "
                                 "this runtime cannot do yet (valid: --finetune, to start from its weights)")])
    if init == "random":
        given("--load", args.load)
        given("--dpoc-hf-weights", args.dpoc_hf_weights)
        given("--ref-model", args.ref_model)
        policy = WeightSource("random", None, "--dpoc-init")
    elif init == "hf":
        given("--load", args.load)
        if not args.dpoc_hf_weights:
            problems.append(Problem(args_file, "--dpoc-hf-weights", "missing: --dpoc-init hf reads the policy from "
                                    "this Hugging Face directory"))
        policy = open_source(args.dpoc_hf_weights, "--dpoc-hf-weights", args_file, problems, kinds=("hf",))
    else:
        given("--dpoc-hf-weights", args.dpoc_hf_weights)
        if not args.load:
            problems.append(Problem(args_file, "--load", "missing: --dpoc-init converted reads the policy from this "
                                    "distributed checkpoint (with --finetune)"))
        policy = open_source(args.load, "--load", args_file, problems, kinds=("checkpoint",))
    reference = open_source(args.ref_model, "--ref-model", args_file, problems) if args.ref_model else policy
    if problems:
        raise DpocError(problems)
    for source in dict.fromkeys((policy, reference)):
        problems += architecture_problems(source, args, args_file)
    if problems:
        raise DpocError(problems)
    return policy, reference


_STARTS = {"random": "a seeded random init", "hf": "--dpoc-hf-weights", "converted": "--load"}


def open_source(path: str | None, flag: str, args_file: str, problems: list[Problem],
                kinds: tuple[str, ...] = ("hf", "checkpoint")) -> WeightSource:
    """The kind of weights `path` holds; a problem when it holds none of `kinds`."""
    source = WeightSource("missing", path, flag)
    if path is None:
        return source
    p = Path(path)
    if not p.is_dir():
        problems.append(Problem(args_file, flag, f"{path}: no such directory"))
        return source
    if (p / "config.json").is_file():
        source = WeightSource("hf", path, flag)
    elif (p / CHECKPOINT_MARKER).is_file():
        source = WeightSource("checkpoint", path, flag)
    elif (p / TRACKER).is_file():
        source = WeightSource("checkpoint", _latest_iteration(p, flag, args_file, problems), flag)
    else:
        problems.append(Problem(args_file, flag, f"{path} holds neither Hugging Face weights (config.json) nor a "
                                f"distributed checkpoint ({CHECKPOINT_MARKER}, or {TRACKER})"))
        return source
    if source.kind not in kinds:
        wanted = {"hf": "Hugging Face weights (config.json)", "checkpoint": "a distributed checkpoint"}
        problems.append(Problem(args_file, flag, f"{path} holds {wanted[source.kind]}, but {flag} takes "
                                f"{' or '.join(wanted[k] for k in kinds)}"))
    return source


def _latest_iteration(save: Path, flag: str, args_file: str, problems: list[Problem]) -> str:
    """A training save directory's newest complete iteration folder (Megatron's tracker file names it)."""
    it = (save / TRACKER).read_text().strip()
    folder = save / ("release" if it == "release" else f"iter_{int(it):07d}" if it.isdigit() else it)
    if not (folder / CHECKPOINT_MARKER).is_file():
        problems.append(Problem(args_file, flag, f"{save}/{TRACKER} names {folder.name}, which is not a complete "
                                f"distributed checkpoint (no {CHECKPOINT_MARKER})"))
    return str(folder)


def architecture_problems(source: WeightSource, args: argparse.Namespace, args_file: str) -> list[Problem]:
    """Hugging Face weights: config.json against megatron.args, then every tensor's presence and shape. A
    checkpoint the converter wrote: its recorded config.json against megatron.args (tensor shapes are
    checked against the built model, see `checkpoint_problems`)."""
    if source.kind == "hf":
        problems = hf_config.mismatches(args, source.path, args_file, source.flag)
        if not problems:
            problems = hf_weights.HfWeights(source.path).problems(Arch.of(hf_config.architecture_from_args(args)))
        return problems
    if source.kind == "checkpoint":
        record = common_state(source.path).get(COMMON_KEY)
        if record and "hf_config" in record:
            shown = f"{source.path}/common.pt ({COMMON_KEY}.hf_config)"
            return hf_config.config_mismatches(record["hf_config"], shown, args, args_file)
    return []


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
        hf_weights.load(chunks, hf_weights.HfWeights(source.path), Arch.of(hf_config.architecture_from_args(args)))
    else:
        problems = problems_everywhere(checkpoint_problems(chunks, source.path))
        if problems:
            raise DpocError(problems)
        template = {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}
        state = dist_checkpointing.load(template, source.path)
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[f"model{i}"])


def describe_weights(path: str) -> dict[str, str]:
    """A weights source's identity: {"kind", "path", "sha256"}. A training save directory is resolved to its
    latest iteration.

    The hash is cheap and content-sensitive: config.json / the checkpoint's metadata files whole, and for
    every data file (safetensors, .distcp) its name, size and 16 blocks of 64 KiB spread over it
    (safetensors headers included). Different weights of one architecture differ in every block, so swapping
    the reference for other weights changes the hash; reading the whole model (tens of GB) to hash it at
    every start would cost more than loading it.
    """
    problems: list[Problem] = []
    source = open_source(path, "path", path, problems)
    if problems:
        raise DpocError(problems)
    folder = Path(source.path)
    digest = hashlib.sha256()
    whole = ("config.json",) if source.kind == "hf" else (CHECKPOINT_MARKER, ".metadata")
    for name in whole:
        if (folder / name).is_file():
            digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    data_suffix = ".safetensors" if source.kind == "hf" else ".distcp"
    for file in sorted(p for p in folder.iterdir() if p.name.endswith(data_suffix)):
        digest.update(_sampled(file))
    return {"kind": source.kind, "path": source.path, "sha256": digest.hexdigest()}


def _sampled(file: Path) -> bytes:
    size = file.stat().st_size
    out = hashlib.sha256(f"{file.name}\0{size}\0".encode())
    with open(file, "rb") as f:
        for i in range(_SAMPLES):
            f.seek(max(0, (size - _SAMPLE_BYTES) * i // (_SAMPLES - 1)))
            out.update(f.read(_SAMPLE_BYTES))
    return out.digest()


def reference_identity(args: argparse.Namespace) -> dict[str, str]:
    """The frozen reference's source and content hash, for training checkpoints to record (random: the seed)."""
    if args.dpoc_init == "random" and not args.ref_model:
        return {"kind": "random", "path": "", "sha256": hashlib.sha256(f"seed {args.seed}".encode()).hexdigest()}
    return describe_weights(args.ref_model or args.dpoc_hf_weights or args.load)


def problems_everywhere(local: list[Problem]) -> list[Problem]:
    """All ranks agree whether to stop: a rank's problems stop every rank (ranks without problems exit 2 too)."""
    flag = torch.tensor([len(local)], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and not local:
        raise SystemExit(2)
    return local
