"""Where weights lie and what they are, torch-free: the node preflight, the checkpoint records and the
precomputed reference log-probs' key use it without importing the runtime's libraries.

`open_source` tells a Hugging Face directory from a distributed checkpoint (or a training save directory, by
its latest iteration); `describe_weights` gives a source's identity (kind, path, content hash), and
`reference_identity` the frozen reference's: training checkpoints record it, so a resumed run can tell that
its reference is still the same weights, and precomputed reference log-probs are keyed by it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from dpoc.contract import megatron_args
from dpoc.contract.errors import DpocError, Problem
from dpoc.contract.runs import CHECKPOINT_MARKER, TRACKER

_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16


@dataclass(frozen=True)
class WeightSource:
    kind: str  # random | hf | checkpoint | resume (checkpoint.py restores a training checkpoint)
    path: str | None  # the directory to read (a checkpoint's iteration folder), None for random
    flag: str  # the megatron.args flag that named it

    def describe(self) -> str:
        if self.kind == "resume":
            return f"the newest intact checkpoint in {self.path}"
        return "seeded random init" if self.kind == "random" else f"{self.kind} {self.path}"


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
    folder = latest_iteration_folder(save)
    if is_per_rank(folder):
        problems.append(Problem(args_file, flag, f"{folder} {PER_RANK}"))
    elif not (folder / CHECKPOINT_MARKER).is_file():
        problems.append(Problem(args_file, flag, f"{save}/{TRACKER} names {folder.name}, which is not a complete "
                                f"distributed checkpoint (no {CHECKPOINT_MARKER})"))
    return str(folder)


PER_RANK = ("is a per-rank Megatron checkpoint (mp_rank_* folders, as MindSpeed-LLM's converter writes), which the "
            "dpoc runtime does not read; valid: a distributed checkpoint from `dpoc convert hf-to-mcore` (the build's "
            "convert/hf_to_mcore.sh), or checkpoint.init hf")


def is_per_rank(folder: Path) -> bool:
    """MindSpeed-LLM's (and legacy Megatron's) layout: one `mp_rank_*` folder per tp/pp rank, no metadata.json —
    what a guide user may already hold at the path the recipe names."""
    return not (folder / CHECKPOINT_MARKER).is_file() and any(folder.glob("mp_rank_*"))


def latest_iteration_folder(save: Path) -> Path:
    """The iteration folder Megatron's tracker file names."""
    it = (save / TRACKER).read_text().strip()
    return save / ("release" if it == "release" else f"iter_{int(it):07d}" if it.isdigit() else it)


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
        digest.update(sampled_digest(file))
    return {"kind": source.kind, "path": source.path, "sha256": digest.hexdigest()}


def sampled_digest(file: Path) -> bytes:
    """A large file's name, size and 16 blocks of 64 KiB spread over it (all of a small one)."""
    size = file.stat().st_size
    out = hashlib.sha256(f"{file.name}\0{size}\0".encode())
    with open(file, "rb") as f:
        for i in range(_SAMPLES):
            f.seek(max(0, (size - _SAMPLE_BYTES) * i // (_SAMPLES - 1)))
            out.update(f.read(_SAMPLE_BYTES))
    return out.digest()


def reference_identity(args: argparse.Namespace) -> dict[str, str]:
    """The frozen reference's source and content hash: every training checkpoint records it, and a resumed run
    must have the same hash (the same weights, wherever they now lie). The seeded init's content is a pure
    function of the seed and the architecture. A LoRA run whose reference is its base with `--lora-load`: the
    base's and the initial adapter's (precomputed log-probs of the base alone are another file)."""
    if args.dpoc_init == "random" and not args.ref_model:
        ident = _seeded_identity(args)
    else:
        ident = _identity(args.ref_model or args.dpoc_hf_weights)
    if args.lora_r is not None and args.lora_load and ident["source"] == lora_base_identity(args)["source"]:
        return _with_adapter(ident, args.lora_load)  # the base with its initial adapter (session.build_models)
    return ident


def _with_adapter(base: dict[str, str], adapter: str) -> dict[str, str]:
    """A LoRA reference of base + `--lora-load`'s PEFT adapter: both named, both hashed (the adapter's config
    whole, its safetensors sampled)."""
    digest = hashlib.sha256(base["sha256"].encode())
    folder = Path(adapter)  # a missing one is refused where it is read (peft.read), naming lora.init_from
    for file in sorted(folder.iterdir()) if folder.is_dir() else ():
        if file.name.endswith(".json"):
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
        elif file.name.endswith(".safetensors"):
            digest.update(sampled_digest(file))
    return {"source": f"{base['source']} + lora {adapter}", "sha256": digest.hexdigest()}


def lora_base_identity(args: argparse.Namespace) -> dict[str, str] | None:
    """A LoRA run's frozen base (None without LoRA): its checkpoints hold only the adapters, so a resume must
    find the same base. It is the policy's initial weights: the seeded init, --dpoc-hf-weights, or the
    converted checkpoint (--load with --finetune; on a resume --dpoc-lora-base)."""
    if args.lora_r is None:
        return None
    if args.dpoc_init == "random":
        return _seeded_identity(args)
    if args.dpoc_init == "hf":
        return _identity(args.dpoc_hf_weights)
    return _identity(args.dpoc_lora_base if megatron_args.resuming(args) else args.load)


def _seeded_identity(args: argparse.Namespace) -> dict[str, str]:
    """The seeded init's content is a pure function of the seed and the architecture: its hash covers those."""
    source = f"seeded-init:seed={args.seed}"
    text = source + "\n" + json.dumps(megatron_args.architecture(args), sort_keys=True)
    return {"source": source, "sha256": hashlib.sha256(text.encode()).hexdigest()}


def _identity(path: str) -> dict[str, str]:
    described = describe_weights(path)
    return {"source": f"{described['kind']} {described['path']}", "sha256": described["sha256"]}
