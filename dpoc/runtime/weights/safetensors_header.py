"""Whether a Hugging Face directory's safetensors files are whole, from their headers alone, torch-free.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape and
`data_offsets`), then the tensors' bytes back to back. A file cut short (an interrupted download or copy) still
opens in part and fails deep inside the loader; the header says exactly how long the file must be, so the node
preflight and the runtime's loader both check it first and name the file in one line.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from dpoc.contract.errors import Problem

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_ITEM_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
_REFETCH = "valid: download or save the weights again"


def weight_files(directory: str | Path) -> tuple[list[Path], list[Problem]]:
    """The safetensors files a Hugging Face directory's index names (or its single file), and what is wrong with
    the index itself."""
    directory = Path(directory)
    index = directory / INDEX
    if not index.is_file():
        return ([directory / SINGLE] if (directory / SINGLE).is_file() else []), []
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        return [], [Problem(str(index), "(file)", f"unreadable index ({type(exc).__name__}: {exc}); {_REFETCH}")]
    files = [directory / name for name in names]
    return files, [Problem(str(f), "(file)", f"missing, but {INDEX} names it; {_REFETCH}")
                   for f in files if not f.is_file()]


def problems(directory: str | Path) -> list[Problem]:
    """Every safetensors file of the directory that is missing, unreadable, or whose tensors do not cover it."""
    files, found = weight_files(directory)
    return found + [p for f in files if f.is_file() for p in file_problems(f)]


def file_problems(path: Path) -> list[Problem]:
    """The header must parse, and its tensors' byte ranges must tile the data section exactly."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or 8 + length > size:
            return [_bad(path, f"truncated: {size} bytes, shorter than its own header says")]
        try:
            header = json.loads(f.read(length))
            ranges = sorted((*entry["data_offsets"], name, entry) for name, entry in header.items()
                            if name != "__metadata__")
        except (ValueError, KeyError, TypeError) as exc:
            return [_bad(path, f"its header is not safetensors JSON ({type(exc).__name__}: {exc})")]
    data = size - 8 - length
    end = 0
    for start, stop, name, entry in ranges:
        item = _ITEM_BYTES.get(entry.get("dtype"))
        if start != end or (item is not None and stop - start != item * math.prod(entry.get("shape", []))):
            return [_bad(path, f"tensor {name}'s bytes [{start}, {stop}) do not follow the previous tensor's end "
                         f"{end} or do not match its dtype and shape")]
        end = stop
    if end != data:
        state = "truncated" if end > data else "has trailing bytes"
        return [_bad(path, f"{state}: its header lists {end} bytes of tensors, the file holds {data} after the "
                     "header")]
    return []


def _bad(path: Path, what: str) -> Problem:
    return Problem(str(path), "(file)", f"{what}; {_REFETCH}")
