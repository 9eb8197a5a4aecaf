"""A safetensors file written tensor by tensor: the header (names, dtypes, shapes, offsets) is known in advance,
so each tensor's bytes go to disk as soon as it is produced and nothing is held back for the whole file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (`BF16`)."""
    return next(t for t, c in DTYPES.items() if c == code)


class StreamingSafetensors:
    """`write` the planned tensors in the planned order; `close` checks that all of them came."""

    def __init__(self, path: Path, planned: list[tuple[str, tuple[int, ...], torch.dtype]]):
        header, offset = {}, 0
        for name, shape, dtype in planned:
            size = dtype.itemsize * _numel(shape)
            header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.planned = [(name, tuple(shape), dtype) for name, shape, dtype in planned]
        self.done = 0
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.file.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.planned[self.done]
        got = (name, tuple(tensor.shape), tensor.dtype)
        if got != expected:
            raise RuntimeError(f"safetensors stream: got {got}, planned {expected}")
        self.file.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))
        self.done += 1

    def close(self) -> None:
        if self.done != len(self.planned):
            raise RuntimeError(f"safetensors stream: {self.done} of {len(self.planned)} tensors written")
        self.file.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
