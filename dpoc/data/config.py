"""The preprocessing config: a YAML file in `schemas/preprocess.schema.json`, optionally overridden by flags.

Paths stay as written: like MindSpeed-RL, relative paths name places relative to the current working
directory (the job directory), never to the config file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpoc.contract.errors import DpocError, Problem


def _schema_properties() -> dict[str, Any]:
    from dpoc.contract.schemas import schema

    return schema("preprocess")["properties"]


# the CLI's choices come from the schema the config file is validated against: one list of each
TEMPLATES = tuple(_schema_properties()["template"]["enum"])
LAYOUTS = tuple(_schema_properties()["layout"]["enum"])
MAP_KEYS = tuple(_schema_properties()["map_keys"]["properties"])


@dataclass(frozen=True)
class PreprocessConfig:
    input: str
    tokenizer: str
    output_prefix: str
    seq_length: int
    format: str = "auto"
    layout: str = "auto"
    template: str = "tokenizer"
    enable_thinking: bool = False
    map_keys: Mapping[str, str] = field(default_factory=dict)
    truncate: str | None = None
    workers: int = 1
    skip_bad_lines: bool = False
    unpaired: bool = False  # write the unpaired (KTO) dataset: pairs are split, unpaired rows kept
    source: str = "command line"  # what error lines name: the config file, or "command line"


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
    from dpoc.contract import schemas

    schemas.require("preprocess", values, source)
    return PreprocessConfig(**values, source=source)
