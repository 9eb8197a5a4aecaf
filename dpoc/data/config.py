"""The preprocessing config: a YAML file in `schemas/preprocess.schema.json`, optionally overridden by flags.

Paths stay as written: like MindSpeed-RL, relative paths name places relative to the current working
directory (the job directory), never to the config file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpoc.errors import DpocError, Problem

TEMPLATES = ("tokenizer", "qwen3", "qwen", "chatml", "llama3", "default")
MAP_KEYS = ("prompt", "query", "system", "chosen", "rejected", "history")


@dataclass(frozen=True)
class PreprocessConfig:
    input: str
    tokenizer: str
    output_prefix: str
    seq_length: int
    format: str = "auto"
    layout: str = "pairwise"
    template: str = "tokenizer"
    enable_thinking: bool = False
    map_keys: Mapping[str, str] = field(default_factory=dict)
    truncate: str | None = None
    workers: int = 1
    skip_bad_lines: bool = False
    source: str = "command line"  # what error lines name: the config file, or "command line"


def schema_path() -> Path:
    """The schema ships inside the wheel as `dpoc/_data/schemas`; in a checkout it is `schemas/`."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "_data" / "schemas", package.parent / "schemas"):
        if (candidate / "preprocess.schema.json").is_file():
            return candidate / "preprocess.schema.json"
    raise FileNotFoundError("preprocess.schema.json is not installed with dpoc")


def read_config_file(path: str) -> dict[str, Any]:
    """The YAML mapping in `path`; unreadable or non-mapping files are user errors naming the file."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DpocError([Problem(path, "(file)", f"cannot read the config ({exc.strerror})")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        raise DpocError([Problem(path, where, f"not valid YAML ({getattr(exc, 'problem', exc)})")]) from None
    if not isinstance(data, dict):
        got = type(data).__name__
        raise DpocError([Problem(path, "(top level)", f"must be a mapping of keys (got {got})")])
    return data


def build_config(values: dict[str, Any], source: str) -> PreprocessConfig:
    """Validate `values` against the schema and freeze them; every problem becomes one DpocError line."""
    problems = schema_problems(values, source)
    if problems:
        raise DpocError(problems)
    return PreprocessConfig(**values, source=source)


def schema_problems(values: dict[str, Any], source: str) -> list[Problem]:
    # A deliberately small rewrite of jsonschema errors into dpoc's one-line form.
    from jsonschema import Draft202012Validator

    schema = json.loads(schema_path().read_text(encoding="utf-8"))
    problems = []
    for error in Draft202012Validator(schema).iter_errors(values):
        where = ".".join(str(p) for p in error.path) or "(top level)"
        kind, got = error.validator, error.instance
        if kind == "additionalProperties":
            allowed = sorted(error.schema.get("properties", {}))
            prefix = "" if where == "(top level)" else where + "."
            problems += [Problem(source, prefix + k, f"unknown key (valid: {', '.join(allowed)})")
                         for k in sorted(set(got) - set(allowed))]
        elif kind == "required":
            problems += [Problem(source, k, "is required") for k in error.validator_value if k not in got]
        elif kind == "enum":
            valid = ", ".join("null" if v is None else str(v) for v in error.validator_value)
            problems.append(Problem(source, where, f"must be one of {valid} (got {got!r})"))
        elif kind == "type":
            problems.append(Problem(source, where, f"must be of type {error.validator_value} (got {got!r})"))
        elif kind == "minimum":
            problems.append(Problem(source, where, f"must be >= {error.validator_value} (got {got!r})"))
        elif kind == "minLength":
            problems.append(Problem(source, where, "must not be empty"))
        else:
            problems.append(Problem(source, where, error.message))
    # "required" reports once per missing key, each time listing all of them
    return sorted(set(problems), key=lambda p: p.where)
