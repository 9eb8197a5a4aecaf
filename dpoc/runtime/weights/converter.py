"""`dpoc convert hf-to-mcore HF_DIR OUT_DIR` and `dpoc convert mcore-to-hf CKPT_DIR OUT_DIR`: streamed, atomic.

hf-to-mcore builds the model on the meta device at tp1/pp1/ep1 (no memory) and saves its own
`sharded_state_dict()` — the keys, global shapes and offsets every layout of that model loads from — with
megatron-core's `dist_checkpointing.save` and a torch_dist strategy whose planner reads each tensor from the
safetensors only when the writer asks for it: one tensor in memory at a time. The common state records the
source (`dpoc_weights`: its identity, config.json, generation_config.json).

mcore-to-hf reads a converted checkpoint or a training save directory (its newest intact iteration, as
resume picks it; optimizer and RNG entries are left alone), one model tensor at a time through the
checkpoint's tensor metadata, and writes config.json, generation_config.json, safetensors (sharded with
model.safetensors.index.json beyond `--max-shard-size`) and the tokenizer files; a LoRA run's checkpoint
(adapters only) goes out as a PEFT adapter directory, or with `--merge` as its base with the adapters merged
in (`lora_export.py`). Both write OUT_DIR as a temporary sibling, fsynced, renamed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
    CachedMetadataFileSystemReader,
)
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner,
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed import checkpoint
from torch.distributed.checkpoint import TensorStorageMetadata

from dpoc import __version__
from dpoc.common.atomic import published_dir
from dpoc.contract import hf_config, megatron_args
from dpoc.contract.architecture import Architecture
from dpoc.contract.errors import DpocError, Problem
from dpoc.contract.runs import MANIFEST, TRACKER, folder_name
from dpoc.data.progress import TransferProgress
from dpoc.runtime.checkpoint import publish
from dpoc.runtime.model import device as devices
from dpoc.runtime.model.gpt import build_chunks, transformer_config
from dpoc.runtime.step.session import initialize_parallel
from dpoc.runtime.weights import lora_export, peft, weight_map
from dpoc.runtime.weights.hf_weights import HfWeights, read_sharded
from dpoc.runtime.weights.safetensors_out import StreamingSafetensors
from dpoc.runtime.weights.sharded import sharded_tensors
from dpoc.runtime.weights.weight_identity import describe_weights, open_source
from dpoc.runtime.weights.weight_map import index_axes
from dpoc.runtime.weights.weight_sources import COMMON_KEY, common_state

SHARD_SIZE = "5GB"
TOKENIZER_FILES = re.compile(r"^(tokenizer.*|vocab\..*|merges\.txt|special_tokens_map\.json|added_tokens\.json|"
                             r"chat_template\.jinja|.*\.tiktoken)$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    p = sub.add_parser("hf-to-mcore", help="Hugging Face weights -> distributed checkpoint (loads at any layout)")
    p.add_argument("source", metavar="HF_DIR")
    p.add_argument("out", metavar="OUT_DIR")
    p = sub.add_parser("mcore-to-hf", help="converted or training checkpoint -> Hugging Face weights")
    p.add_argument("source", metavar="CKPT_DIR", help="a converted checkpoint, or a save directory (latest iteration)")
    p.add_argument("out", metavar="OUT_DIR")
    p.add_argument("--plan", help="the build's plan.json: the architecture (default: the one the checkpoint records)")
    p.add_argument("--tokenizer", help="a directory whose tokenizer files are copied next to the weights")
    p.add_argument("--max-shard-size", default=SHARD_SIZE, help=f"per safetensors file (default {SHARD_SIZE})")
    p.add_argument("--merge", action="store_true",
                   help="a LoRA checkpoint: write the base with the adapters merged in (default: a PEFT adapter)")


def run(args: argparse.Namespace) -> int:
    if args.direction == "hf-to-mcore":
        hf_to_mcore(args.source, args.out)
    else:
        mcore_to_hf(args.source, args.out, plan=args.plan, tokenizer=args.tokenizer,
                    max_shard_bytes=parse_size(args.max_shard_size), merge=args.merge)
    return 0


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?B?)", text.strip().upper())
    if not match:
        raise DpocError([Problem("dpoc convert", "--max-shard-size", f"{text!r} is not a size (valid: e.g. 5GB, "
                                 "500MB, 100KB)")])
    scale = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[match.group(2)]
    return int(float(match.group(1)) * scale)


# ---------------------------------------------------------------------------------------------- hf -> mcore


def hf_to_mcore(source: str, out: str) -> None:
    config = hf_config.read_config(source, "HF_DIR", "dpoc convert hf-to-mcore")
    arch = hf_config.architecture(config, hf_config.config_path(source))
    weights = HfWeights(source)
    problems = weights.problems(Architecture.of(arch))
    if problems:
        raise DpocError(problems)
    generation = Path(source) / "generation_config.json"
    record = {"source": describe_weights(source), "hf_config": config, "dpoc_version": __version__,
              "generation_config": json.loads(generation.read_text()) if generation.is_file() else None}
    device = devices.select("cpu", "gloo")  # the CPU bridge: the converter never needs an accelerator
    with _single_process(), devices.running_on(device), published_dir(out) as staging:
        chunk = _meta_model(arch, device)
        state = chunk.sharded_state_dict()
        strategy = _StreamingSave(weights, Architecture.of(arch))
        strategy.prepare(state)
        dist_checkpointing.save({**state, COMMON_KEY: record}, str(staging), sharded_strategy=strategy)


def _meta_model(arch: dict[str, Any], device: devices.Device):
    """The model at tp1/pp1/ep1 on the meta device: its sharded state dict, no memory behind it."""
    flags = [f"{flag}={value}" if value is not True else flag for flag, value in hf_config.model_flags(arch)]
    args = megatron_args.parse([*flags, "--dpoc-device=cpu", "--distributed-backend=gloo"], require_job=False)
    initialize_parallel(args)
    config = dataclasses.replace(transformer_config(args, device), perform_initialization=False)
    with torch.device("meta"):
        return build_chunks(config, args)[0]


class _StreamingSave(SaveShardedStrategy):
    """megatron-core's torch_dist format, written by torch's FileSystemWriter (one tensor in flight) with a
    planner that reads each tensor from the Hugging Face files when the writer asks for it."""

    def __init__(self, weights: HfWeights, arch: Architecture):
        super().__init__("torch_dist", 1)
        self.weights, self.arch = weights, arch
        self.sources: dict[tuple[str, tuple[int, ...]], Any] = {}

    def prepare(self, state: dict) -> None:
        """Give every ShardedTensor the dtype its Hugging Face tensors have (the checkpoint keeps it exactly)."""
        apply_factories(state)
        for sh in sharded_tensors(state):
            k = index_axes(sh.key)
            name = weight_map.pieces(sh.key, tuple(sh.global_offset[:k]), self.arch)[0].name
            dtype = self.weights.dtype(name)
            sh.data = torch.empty(sh.data.shape, dtype=dtype, device="meta")
            self.sources[(sh.key, tuple(sh.global_offset))] = sh

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict: dict, checkpoint_dir) -> None:
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        total = sum(sh.data.numel() * sh.data.element_size() for sh in self.sources.values())
        progress = TransferProgress("hf-to-mcore", len(self.sources), total)
        weights, arch, sources = self.weights, self.arch, self.sources

        class OnDemand(MCoreSavePlanner):
            def resolve_data(self, write_item):
                if write_item.tensor_data is None:  # a ShardedObject's bytes
                    return super().resolve_data(write_item)
                sh = sources[(write_item.index.fqn, tuple(write_item.index.offset))]
                tensor = read_sharded(sh, weights, arch, dtype=sh.data.dtype)
                progress.advance(tensor.numel() * tensor.element_size())
                return tensor.view((1,) * sh.prepend_axis_num + tuple(sh.local_shape))

        checkpoint.save(mcore_to_pyt_state_dict(flat, False),
                        storage_writer=checkpoint.FileSystemWriter(str(checkpoint_dir), thread_count=1),
                        planner=OnDemand(dedup_replicated_tensors=False, flatten_state_dict=False))
        progress.update(final=True)


# ---------------------------------------------------------------------------------------------- mcore -> hf


def mcore_to_hf(source: str, out: str, plan: str | None = None, tokenizer: str | None = None,
                max_shard_bytes: int = int(1e9) * 5, merge: bool = False, transform: Transform | None = None
                ) -> None:
    """`transform(hf name, tensor)`: what is written for each HF tensor (a LoRA merge), default the tensor."""
    folder = _checkpoint_folder(source)
    trained = lora_export.record(folder)
    if trained is not None:
        _lora_to_hf(folder, trained, out, plan, tokenizer, max_shard_bytes, merge)
        return
    if merge:
        raise DpocError([Problem(folder, "--merge", "not a LoRA checkpoint: it holds the whole model already "
                                 "(valid: leave --merge out)")])
    record = common_state(folder).get(COMMON_KEY) or {}
    reader = _Reader(folder)
    stored = {k: v for k, v in reader.metadata.state_dict_metadata.items()
              if isinstance(v, TensorStorageMetadata) and k.startswith(weight_map.MODEL_PREFIXES)}
    if plan is not None:
        arch_dict = _plan_architecture(plan)
        embedding = stored.get(weight_map.EMBEDDING)
        dtype = str(embedding.properties.dtype).removeprefix("torch.") if embedding else "float32"
        config = {**hf_config.hf_config(arch_dict, dtype), **_special_ids(record.get("hf_config") or {}, tokenizer)}
    elif "hf_config" in record:
        config = record["hf_config"]
        arch_dict = hf_config.architecture(config, f"{folder}/common.pt ({COMMON_KEY}.hf_config)")
    else:
        raise DpocError([Problem(folder, "(architecture)", "the checkpoint records no config.json (it was not "
                                 "written by dpoc convert): give --plan BUILD/plan.json")])
    arch = Architecture.of(arch_dict)
    units = list(weight_map.units(arch))
    problems = _unit_problems(folder, stored, units, arch)
    if problems:
        raise DpocError(problems)
    shards = _plan_shards(units, arch, stored, max_shard_bytes)
    with _single_process(), published_dir(out) as staging:
        _write_weights(staging, shards, reader, arch, transform or _unchanged)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (staging / "generation_config.json").write_text(json.dumps(
            _generation_config(record, tokenizer, config), indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            _copy_tokenizer(tokenizer, staging)


def _lora_to_hf(folder: str, trained: dict, out: str, plan: str | None, tokenizer: str | None, max_shard_bytes: int,
                merge: bool) -> None:
    """A LoRA checkpoint (adapters only): a PEFT adapter directory for its base, or (`merge`) the base with the
    adapters merged in, written as the base's own format converts (a converted base through mcore_to_hf)."""
    if plan is None:
        raise DpocError([Problem(folder, "--plan", "a LoRA checkpoint holds only adapters: give --plan "
                                 "BUILD/plan.json for the architecture they sit on")])
    arch = Architecture.of(_plan_architecture(plan))
    lora = lora_export.settings(trained)
    reader = _Reader(folder)
    with _single_process():
        adapters = lora_export.adapters(folder, reader.metadata.state_dict_metadata, reader.read, arch, lora)
    base = lora_export.base(folder, trained, merge)
    if not merge:
        peft.write(out, adapters, arch, lora, base.path if base is not None else None)
        return
    transform = lora_export.merging(adapters, arch, lora)
    if base.kind == "hf":
        lora_export.merge_into_hf(base.path, out, transform)
    else:
        mcore_to_hf(base.path, out, plan, tokenizer, max_shard_bytes, transform=transform)


def _checkpoint_folder(source: str) -> str:
    """The folder to convert: a training save directory's newest intact checkpoint (as resume picks it: a
    damaged newer one is named and skipped), else the converted checkpoint or iteration folder `source` names."""
    root = Path(source)
    found = publish.iterations(root)
    if (root / TRACKER).is_file() and any((root / folder_name(i) / MANIFEST).is_file() for i in found):
        folder, warnings = publish.newest_intact(root, found, publish.verify, "convert another save directory")
        for warning in warnings:
            print(warning, file=sys.stderr)
        return str(folder)
    problems: list[Problem] = []
    folder = open_source(source, "CKPT_DIR", "dpoc convert mcore-to-hf", problems, kinds=("checkpoint",)).path
    if problems:
        raise DpocError(problems)
    return folder


def _plan_architecture(plan_file: str) -> dict[str, Any]:
    try:
        model = json.loads(Path(plan_file).read_text())["model"]
    except (OSError, ValueError, KeyError) as exc:
        raise DpocError([Problem(plan_file, "model", f"cannot read the plan's model section: {exc}")]) from None
    return model


def _unit_problems(folder: str, stored: dict, units: list, arch) -> list[Problem]:
    """Every weight the architecture needs that is missing or of another shape, and every model tensor of the
    checkpoint the architecture has no place for (converting would drop it)."""
    counts = {0: (), 1: (arch.num_layers,), 2: (arch.num_layers, arch.num_experts)}
    out, keys = [], set()
    for key, index in units:
        if key in keys:
            continue
        keys.add(key)
        expected = (*counts[index_axes(key)], *weight_map.hf_shape(key, index, arch))
        if key not in stored:
            out.append(Problem(folder, key, f"missing (the architecture needs global shape {list(expected)})"))
        elif tuple(stored[key].size) != expected:
            out.append(Problem(folder, key, f"global shape {list(stored[key].size)} in the checkpoint, but the "
                               f"architecture needs {list(expected)}"))
    for key in sorted(set(stored) - keys):
        out.append(Problem(folder, key, "is not a weight of this architecture: converting would drop it"))
    return out


@dataclasses.dataclass
class _Shard:
    units: list  # (key, index) in order
    tensors: list  # (hf name, shape, dtype) in the order they are written


def _plan_shards(units: list, arch, stored: dict, max_bytes: int) -> list[_Shard]:
    """Whole units per file (a unit's HF tensors are produced together), files filled up to `max_bytes`."""
    shapes = weight_map.hf_tensors(arch)
    shards: list[_Shard] = [_Shard([], [])]
    size = 0
    for key, index in units:
        dtype = stored[key].properties.dtype
        names = list(dict.fromkeys(p.name for p in weight_map.pieces(key, index, arch)))
        tensors = [(n, shapes[n], dtype) for n in names]
        nbytes = sum(math.prod(s) * dtype.itemsize for _, s, _ in tensors)
        if shards[-1].units and size + nbytes > max_bytes:
            shards.append(_Shard([], []))
            size = 0
        shards[-1].units.append((key, index))
        shards[-1].tensors += tensors
        size += nbytes
    return shards


Transform = Callable[[str, torch.Tensor], torch.Tensor]


def _unchanged(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _write_weights(staging: Path, shards: list[_Shard], reader: _Reader, arch, transform: Transform) -> None:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))] \
        if len(shards) > 1 else ["model.safetensors"]
    total = sum(math.prod(s) * d.itemsize for shard in shards for _, s, d in shard.tensors)
    progress = TransferProgress("mcore-to-hf", sum(len(s.units) for s in shards), total)
    weight_map_json = {}
    for file, shard in zip(names, shards, strict=True):
        stream = StreamingSafetensors(staging / file, shard.tensors)
        for key, index in shard.units:
            unit = reader.read(key, index)
            parts: dict[str, list] = {}
            row = 0
            for piece in weight_map.pieces(key, index, arch):
                parts.setdefault(piece.name, []).append((piece.start, unit[row:row + piece.rows]))
                row += piece.rows
            for name, rows in parts.items():
                tensor = torch.cat([t for _, t in sorted(rows, key=lambda r: r[0])]) if len(rows) > 1 else rows[0][1]
                stream.write(name, transform(name, tensor))
                weight_map_json[name] = file
            progress.advance(unit.numel() * unit.element_size())
        stream.close()
    progress.update(final=True)
    if len(shards) > 1:
        (staging / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map_json}, indent=2, sort_keys=True) + "\n")


class _Reader:
    """One model tensor (key, index) at a time out of a torch_dist checkpoint, through its tensor metadata;
    only the stored chunks that overlap it are read."""

    def __init__(self, folder: str):
        self.reader = CachedMetadataFileSystemReader(folder)
        self.metadata = self.reader.read_metadata()

    def read(self, key: str, index: tuple[int, ...]):
        meta = self.metadata.state_dict_metadata[key]
        size = tuple(meta.size)
        # the index axes as real singleton axes (not megatron's prepended ones): one chunk of the global
        # tensor, which DCP reads from the stored chunks it overlaps
        out = torch.empty((1,) * len(index) + size[len(index):], dtype=meta.properties.dtype)
        offsets = [(axis, i, size[axis]) for axis, i in enumerate(index)]
        sh = ShardedTensor.from_rank_offsets(key, out, *offsets, replica_id=0)
        checkpoint.load(mcore_to_pyt_state_dict({key: [sh]}, is_loading=True), storage_reader=self.reader,
                        planner=MCoreLoadPlanner(), no_dist=True)
        return out.view(size[len(index):])


def _generation_config(record: dict, tokenizer: str | None, config: dict) -> dict:
    """The source's, else the tokenizer directory's (often the original weights), over config.json's special
    token ids (a generation_config.json without them would leave generate() without an end token)."""
    special = {key: config[key] for key in _SPECIAL_TOKEN_IDS if config.get(key) is not None}
    if record.get("generation_config"):
        return {**special, **record["generation_config"]}
    if tokenizer is not None and (Path(tokenizer) / "generation_config.json").is_file():
        return {**special, **json.loads((Path(tokenizer) / "generation_config.json").read_text())}
    return special


_SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _special_ids(source_config: dict, tokenizer: str | None) -> dict[str, int]:
    """bos/eos/pad ids for a config.json made from an architecture: the source config.json's where it has
    them, else the tokenizer's."""
    ids = {k: source_config[k] for k in _SPECIAL_TOKEN_IDS if source_config.get(k) is not None}
    if tokenizer is not None and len(ids) < len(_SPECIAL_TOKEN_IDS):
        from dpoc.data.encode import load_tokenizer

        loaded = load_tokenizer(tokenizer, "--tokenizer")
        ids = {**{k: getattr(loaded, k) for k in _SPECIAL_TOKEN_IDS if getattr(loaded, k, None) is not None}, **ids}
    return ids


def _copy_tokenizer(tokenizer: str, staging: Path) -> None:
    if not Path(tokenizer).is_dir():
        raise DpocError([Problem(tokenizer, "--tokenizer", "no such directory")])
    for name in sorted(os.listdir(tokenizer)):
        if TOKENIZER_FILES.match(name) and (Path(tokenizer) / name).is_file():
            shutil.copyfile(Path(tokenizer) / name, staging / name)


class _single_process:
    """A one-process gloo group on loopback for megatron-core's collectives, when no group exists yet."""

    def __enter__(self):
        self.created = not dist.is_initialized()
        if self.created:
            dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
        return self

    def __exit__(self, *exc) -> None:
        if self.created:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()
