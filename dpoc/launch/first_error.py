"""The first error in a failed node's output: the last line of the first traceback of the rank that failed
first, which torchrun's closing summary ("ChildFailedError ... Root Cause") names but does not quote.

torchrun passes its workers' output through; an uncaught exception's lines may carry `[rankN]:` prefixes.
When the summary names the first failing rank, that rank's traceback is taken; else the first traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_TRACEBACK = "Traceback (most recent call last):"
_PREFIX = re.compile(r"\[rank(\d+)\]:\s?")
_ROOT_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


def first_error(lines: Iterable[str]) -> str | None:
    lines = list(lines)
    root = _root_rank(lines)
    open_traceback: set[str | None] = set()
    for line in lines:
        prefix = _PREFIX.match(line)
        rank = prefix.group(1) if prefix else None
        body = line[prefix.end():] if prefix else line
        if root is not None and rank is not None and rank != root:
            continue
        if body.startswith(_TRACEBACK):
            open_traceback.add(rank)
        elif rank in open_traceback and body.strip() and not body[0].isspace() and not body.startswith(_CHAINED):
            return body
    return None


def _root_rank(lines: list[str]) -> str | None:
    """The rank of torchrun's "Root Cause (first observed failure)" entry, when its summary is there."""
    for k, line in enumerate(lines):
        if "Root Cause" in line:
            for later in lines[k + 1:k + 8]:
                found = _ROOT_RANK.match(later)
                if found:
                    return found.group(1)
    return None
