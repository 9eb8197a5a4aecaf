"""Streaming readers: JSON Lines, JSON arrays and Parquet, yielded in small chunks so memory stays flat.

A chunk is a list of `Row`s plus how far into the input it reaches (bytes or rows), which drives the
progress line. JSON Lines rows stay undecoded bytes here: decoding happens in the worker processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dpoc.contract.errors import DpocError, Problem
from dpoc.data.fields import BadRow

FORMATS = ("jsonl", "json", "parquet")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
_READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class Row:
    where: str  # "line 17", "element 3 (line 9)", "row 12": for error lines
    data: Any  # bytes (one JSON Lines line, not yet decoded) or a decoded record


@dataclass(frozen=True)
class Chunk:
    rows: list[Row]
    position: int  # bytes or rows consumed so far, comparable with `Source.total`


@dataclass(frozen=True)
class Source:
    path: str
    format: str
    total: int  # file size in bytes, or number of rows for Parquet
    unit: str  # "B" or "rows"


def open_source(path: str, fmt: str, config_file: str) -> Source:
    """Check the input exists and settle its format (`auto` picks by extension, then by first byte)."""
    if not os.path.isfile(path):
        why = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
        raise DpocError([Problem(config_file, "input", f"{path} {why} (relative paths are taken from the "
                                 f"current directory, {os.getcwd()})")])
    if fmt == "auto":
        fmt = _guess_format(path, config_file)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise DpocError([Problem(path, "(file)", f"not a readable Parquet file ({exc})")]) from None
        return Source(path, fmt, rows, "rows")
    return Source(path, fmt, os.path.getsize(path), "B")


def _guess_format(path: str, config_file: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    fmt = _EXTENSIONS.get(ext)
    if fmt is None:
        raise DpocError([Problem(config_file, "format", f"cannot tell the format of {path} from its "
                                 f"extension {ext or '(none)'} (valid: {', '.join(sorted(_EXTENSIONS))}; "
                                 f"or set format: {' | '.join(FORMATS)})")])
    if fmt == "json":  # many .json files are really JSON Lines
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
        fmt = "json" if head.startswith(b"[") else "jsonl"
    return fmt


def decode(row: Row) -> Any:
    """The row's record: JSON Lines bytes are decoded here (in the workers); other formats come decoded."""
    if not isinstance(row.data, bytes):
        return row.data
    try:
        return json.loads(row.data.rstrip(b"\r\n").decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadRow(f"not valid UTF-8 ({exc.reason} at byte {exc.start + 1})") from None
    except json.JSONDecodeError as exc:
        raise BadRow(f"not valid JSON ({exc.msg} at column {exc.pos + 1})") from None


def read_chunks(source: Source, rows_per_chunk: int) -> Iterator[Chunk]:
    reader = {"jsonl": _jsonl_chunks, "json": _json_array_chunks, "parquet": _parquet_chunks}[source.format]
    return reader(source.path, rows_per_chunk)


def _jsonl_chunks(path: str, rows_per_chunk: int) -> Iterator[Chunk]:
    rows: list[Row] = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                rows.append(Row(f"line {number}", line))
            if len(rows) >= rows_per_chunk:
                yield Chunk(rows, f.tell())
                rows = []
        if rows:
            yield Chunk(rows, f.tell())


def _json_array_chunks(path: str, rows_per_chunk: int) -> Iterator[Chunk]:
    """Decode one array element at a time from a sliding text buffer, never the whole file."""
    decoder = json.JSONDecoder()
    rows: list[Row] = []
    with open(path, encoding="utf-8") as f:
        buffer, start, line, consumed, element = "", 0, 1, 0, 0
        expect = "["  # what may come next: "[", then "value_or_end", then "comma_or_end" / "value"
        done = False
        while not done:
            block = f.read(_READ_BLOCK)
            buffer = buffer[start:] + block
            start = 0
            at_eof = not block
            while True:
                skipped = len(buffer) - start - len(buffer[start:].lstrip())
                line += buffer.count("\n", start, start + skipped)
                start += skipped
                if start >= len(buffer):
                    break
                char = buffer[start]
                if expect == "[":
                    if char != "[":
                        _bad_array(path, line, "the file does not start with '['")
                    start, expect = start + 1, "value_or_end"
                elif expect in ("comma_or_end", "value_or_end") and char == "]":
                    done = True
                    break
                elif expect == "comma_or_end":
                    if char != ",":
                        _bad_array(path, line, f"expected ',' or ']' after element {element}, found {char!r}")
                    start, expect = start + 1, "value"
                else:
                    try:
                        value, end = decoder.raw_decode(buffer, start)
                    except json.JSONDecodeError as exc:
                        if not at_eof:
                            break  # the element may continue in the next block
                        _bad_array(path, line + buffer.count("\n", start, exc.pos), exc.msg)
                    if end == len(buffer) and not at_eof:
                        break  # a number may continue in the next block
                    element += 1
                    rows.append(Row(f"element {element} (line {line})", value))
                    line += buffer.count("\n", start, end)
                    start, expect = end, "comma_or_end"
                    if len(rows) >= rows_per_chunk:
                        yield Chunk(rows, consumed + len(buffer[:start].encode()))
                        rows = []
            if at_eof and not done:
                _bad_array(path, line, "the file ends before the closing ']'")
            consumed += len(buffer[:start].encode())
    if rows:
        yield Chunk(rows, consumed)


def _bad_array(path: str, line: int, what: str) -> None:
    raise DpocError([Problem(path, f"line {line}", f"not a valid JSON array: {what} (JSON arrays cannot "
                             "skip bad elements; JSON Lines can, with --skip-bad-lines)")])


def _parquet_chunks(path: str, rows_per_chunk: int) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    done = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=rows_per_chunk):
        records = batch.to_pylist()
        yield Chunk([Row(f"row {done + i + 1}", r) for i, r in enumerate(records)], done + len(records))
        done += len(records)
