"""A LoRA checkpoint on its way out: its adapters read from the checkpoint, its frozen base found and checked,
and the merge W + (alpha / r) · B·A applied tensor by tensor as the weights stream out.

A LoRA run's checkpoint holds only the adapters (`<linear>.lora_A` / `.lora_B` beside where the weight's key
would be, in global shapes) and records, in `dpoc_checkpoint.json`'s `lora`, the settings and the identity of
the base (`<kind> <path>` and its content hash), which must still match for a merge.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from dpoc.common.atomic import published_dir
from dpoc.contract.architecture import Architecture
from dpoc.contract.errors import DpocError, Problem
from dpoc.contract.lora import Lora
from dpoc.runtime.weights import peft
from dpoc.runtime.weights.safetensors_out import StreamingSafetensors, torch_dtype
from dpoc.runtime.weights.weight_identity import WeightSource, describe_weights, open_source

RECORDS = "dpoc_checkpoint.json"  # written by dpoc/runtime/checkpoint/save_load.py


def record(folder: str) -> dict | None:
    """The checkpoint's `lora` record; None for a full-parameter or converted checkpoint."""
    path = Path(folder) / RECORDS
    return json.loads(path.read_text()).get("lora") if path.is_file() else None


def settings(trained: dict) -> Lora:
    return Lora(rank=trained["rank"], alpha=float(trained["alpha"]), dropout=float(trained["dropout"]),
                targets=tuple(trained["targets"]), experts=trained["experts"], init_from=None)


def adapters(folder: str, stored: dict, read: Callable[[str, tuple[int, ...]], torch.Tensor], arch: Architecture,
             lora: Lora) -> dict[peft.Site, peft.Pair]:
    """Every adapter the settings give the architecture, read (key, index) at a time."""
    out, missing = {}, []
    for site in peft.sites(arch, lora):
        key, index = site.weight()
        names = [key.removesuffix("weight") + part for part in ("lora_A", "lora_B")]
        if any(name not in stored for name in names):
            missing.append(names[0])
            continue
        a, b = (read(name, index) for name in names)
        out[site] = (a, b)
    if missing:
        raise DpocError([Problem(folder, missing[0], "missing: the checkpoint's lora record says this linear has an "
                                 "adapter (a checkpoint of another architecture? check --plan)")])
    return out


def base(folder: str, trained: dict, merge: bool) -> WeightSource | None:
    """The frozen base the adapters were trained on, as the record names it, with the same content hash; None
    for the seeded init (no weights: nothing to merge into)."""
    kind, _, path = trained["base"]["source"].partition(" ")
    if kind.startswith("seeded-init"):
        if merge:
            raise DpocError([Problem(folder, "--merge", f"the base is the {kind} (no weights to merge into; "
                                     "valid: leave --merge out for the adapter alone)")])
        return None
    problems: list[Problem] = []
    source = open_source(path, "lora base", f"{folder}/{RECORDS}", problems)
    if problems:
        raise DpocError(problems)
    found = describe_weights(path)["sha256"]
    if found != trained["base"]["sha256"]:
        raise DpocError([Problem(folder, "lora base", f"{path} now holds other weights (sha256 {found[:12]}) than "
                                 f"the base the adapters were trained on ({trained['base']['sha256'][:12]}); valid: "
                                 "the original base at that path")])
    return source


def merging(trained: dict[peft.Site, peft.Pair], arch: Architecture, lora: Lora
            ) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """`(hf name, weight) -> merged weight`, as PEFT's merge_and_unload computes it."""
    by_module = peft.hf_adapters(trained, arch)
    return lambda name, weight: peft.merged(name, weight, by_module, lora.scaling)


def merge_into_hf(source: str, out: str, transform: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """A Hugging Face base with the adapters merged in: the same files, shards and index, each tensor through
    `transform` as it is streamed out."""
    with published_dir(out) as staging:
        for name in sorted(os.listdir(source)):
            path = Path(source) / name
            if name.endswith(".safetensors"):
                with safe_open(str(path), "pt") as f:
                    keys = list(f.keys())
                    planned = [(k, tuple(f.get_slice(k).get_shape()), torch_dtype(f.get_slice(k).get_dtype()))
                               for k in keys]
                    stream = StreamingSafetensors(staging / name, planned)
                    for key in keys:
                        stream.write(key, transform(key, f.get_tensor(key)))
                    stream.close()
            elif path.is_file():
                shutil.copyfile(path, staging / name)
