"""`dpoc diff A B`: what differs between two jobs, each a recipe (with overrides) or a build directory.

Every resolved value that differs, old → new with both provenances; values that stayed but now come from
elsewhere; and the build's files whose content differs once each side's plan hash (script headers, launch
tokens) is set aside — a file whose only change is the hash is counted, not listed. `--files` shows the
changed lines of each (a unified diff). A build directory is read from its plan.json, manifest.json and
files; a recipe is resolved and rendered in memory, never written. Exit 1 when they differ, 0 when equal,
as `diff` does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpoc.contract.errors import DpocError, Problem
from dpoc.contract.plan import Source, plan_values, source_at

_SHOWN = 70  # characters of a value the text form shows (--json has them whole)
_ABSENT = "(absent)"  # value and source of a path one side does not have (model.moe.* of a dense model)


@dataclass(frozen=True)
class Job:
    """One side of the comparison: its resolved values, their provenance and its files' hashes."""

    label: str
    values: dict[str, Any]
    provenance: dict[str, Source]
    files: dict[str, str]  # build-relative path -> text, the plan hash masked; manifest.json left out
    hashes: dict[str, str]  # build-relative path -> sha256 of the file as written


def load_job(arg: str, overrides: Sequence[str]) -> Job:
    path = Path(arg)
    if path.is_dir():
        if overrides:
            raise DpocError([Problem(arg, "(command line)", f"overrides apply to recipes, and {arg} is a build "
                                     f"directory; valid: a recipe file, or no overrides ({' '.join(overrides)})")])
        return _built(path, arg)
    from dpoc.compiler.pipeline import plan_recipe
    from dpoc.compiler.render.render import file_hashes, render

    plan = plan_recipe(arg, overrides)
    label = " ".join([arg, *overrides])
    files = render(plan)
    return Job(label, plan_values(plan.to_dict()), dict(plan.provenance), _masked(files, plan.hash()),
               file_hashes(files))


def _built(build: Path, arg: str) -> Job:
    data = {}
    for name in ("plan.json", "manifest.json"):
        data[name] = json.loads(_read(build / name))
    plan, manifest = data["plan.json"], data["manifest.json"]
    provenance = {path: Source(**src) for path, src in plan.get("provenance", {}).items()}
    files = {rel: _read(build / rel) for rel in manifest["files"]}
    return Job(arg, plan_values(plan), provenance, _masked(files, manifest["plan_hash"]), manifest["files"])


def _read(path: Path) -> str:
    try:
        text = path.read_text()
        if path.suffix == ".json":
            json.loads(text)
        return text
    except OSError as exc:
        raise DpocError([Problem(str(path), "(file)", f"cannot read it ({exc.strerror}); valid: a build "
                                 "directory written by dpoc build, or a recipe file")]) from None
    except ValueError as exc:
        raise DpocError([Problem(str(path), "(file)", f"not valid JSON: {exc}")]) from None


_PLAN = "<plan hash>"


def _masked(files: dict[str, str], plan_hash: str) -> dict[str, str]:
    """Each file with its side's plan hash (whole, or the 12 characters headers show) replaced by one mark."""
    return {rel: text.replace(plan_hash, _PLAN).replace(plan_hash[:12], _PLAN) for rel, text in files.items()}


def compare(a: Job, b: Job) -> dict[str, Any]:
    """The differences, as plain data (what --json prints)."""
    values, sources = [], []
    for path in sorted(a.values.keys() | b.values.keys()):
        old, new = a.values.get(path, _ABSENT), b.values.get(path, _ABSENT)
        src_old, src_new = _source(a, path), _source(b, path)
        row = {"path": path, "old": old, "new": new, "old_source": src_old, "new_source": src_new}
        if old != new:
            values.append(row)
        elif src_old != src_new:
            sources.append(row)
    both = sorted(a.files.keys() & b.files.keys())
    files = {
        "changed": [p for p in both if a.files[p] != b.files[p]],
        "only_in_a": sorted(a.files.keys() - b.files.keys()),
        "only_in_b": sorted(b.files.keys() - a.files.keys()),
    }
    hash_only = [p for p in both if a.files[p] == b.files[p] and a.hashes[p] != b.hashes[p]]
    equal = not values and not sources and not any(files.values())
    return {"a": a.label, "b": b.label, "equal": equal, "values": values, "sources": sources,
            "files": {**files, "plan_hash_only": hash_only},
            "lines": {p: _unified(a.files[p], b.files[p], p) for p in files["changed"]}}


def _unified(old: str, new: str, path: str) -> list[str]:
    import difflib

    return [line.rstrip("\n") for line in difflib.unified_diff(
        old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{path}", f"b/{path}", n=1)]


def _source(job: Job, path: str) -> str:
    return source_at(job.provenance, path).source if path in job.values else _ABSENT


def text(diff: dict[str, Any], with_lines: bool = False) -> str:
    lines = [f"a: {diff['a']}", f"b: {diff['b']}"]
    if diff["equal"]:
        return "\n".join([*lines, "no differences"]) + "\n"
    if diff["values"]:
        lines.append(f"values ({len(diff['values'])} differ):")
        lines += [f"  {r['path']}: {_shown(r['old'])} ({r['old_source']}) → {_shown(r['new'])} ({r['new_source']})"
                  for r in diff["values"]]
    if diff["sources"]:
        lines.append(f"same values from another source ({len(diff['sources'])}):")
        lines += [f"  {r['path']}: {_shown(r['old'])} ({r['old_source']} → {r['new_source']})"
                  for r in diff["sources"]]
    files = diff["files"]
    count = sum(len(files[kind]) for kind in ("changed", "only_in_a", "only_in_b"))
    if count:
        lines.append(f"files ({count} differ):")
        for kind, word in (("changed", "changed   "), ("only_in_a", "only in a "), ("only_in_b", "only in b ")):
            lines += [f"  {word}{path}" for path in files[kind]]
    if files["plan_hash_only"]:
        lines.append(f"({len(files['plan_hash_only'])} more files differ only in the plan hash of their header)")
    if with_lines:
        for path in files["changed"]:
            lines += diff["lines"][path]
    elif files["changed"]:
        lines.append("(--files shows the changed lines)")
    return "\n".join(lines) + "\n"


def _shown(value: Any) -> str:
    if value == _ABSENT:
        return value
    shown = json.dumps(value, ensure_ascii=False)
    return shown if len(shown) <= _SHOWN else shown[: _SHOWN - 1] + "…"


def diff_command(a: str, b: str, a_overrides: Sequence[str], b_overrides: Sequence[str], as_json: bool,
                 with_lines: bool = False) -> int:
    result = compare(load_job(a, a_overrides), load_job(b, b_overrides))
    shown = json.dumps(result, indent=2, ensure_ascii=False) + "\n" if as_json else text(result, with_lines)
    print(shown, end="")
    return 0 if result["equal"] else 1
