"""The first error in a failed node's output: the last line of the first traceback of the rank that failed
first, which the node's torchrun (`dpoc.runtime.torchrun`) names in its closing line but does not quote.

torchrun passes its workers' output through; an uncaught exception's lines may carry `[rankN]:` prefixes.
When the closing line names the first failing rank, that rank's traceback is taken; else the first traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from dpoc.contract.runs import FIRST_FAILURE

_TRACEBACK = "Traceback (most recent call last):"
_PREFIX = re.compile(r"\[rank(\d+)\]:\s?")
_ROOT_RANK = re.compile(re.escape(FIRST_FAILURE.split("{rank}")[0]) + r"(\d+)")
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
    """The rank the closing line names as the first to fail, when the output has it."""
    for line in lines:
        found = _ROOT_RANK.match(line)
        if found:
            return found.group(1)
    return None
