"""User-facing errors: one line per problem, `<file>: <where>: <what> (<numbers>; valid: <alternatives>)`.

Every command raises `DpocError` for bad input; the CLI prints its lines to stderr and exits 2, with no
traceback. `where` is a dotted recipe field (`parallelism.tp`) or a place in a file (`line 17`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped on SIGTERM after saving a checkpoint; run again to resume


@dataclass(frozen=True)
class Problem:
    file: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: {self.message}"


def suggest(name: str, known: list[str]) -> str:
    """`did you mean 'x'? ` for the closest known name (a longer name it starts, else the most similar), or ''."""
    import difflib

    close = [k for k in known if k.startswith(name)] or difflib.get_close_matches(name, known, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def counted(n: int, noun: str) -> str:
    """`1 node`, `2 nodes`: what every message says of a count."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


class DpocError(Exception):
    """One or more problems with the user's input; never a bug in dpoc."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
