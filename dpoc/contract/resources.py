"""Where schemas, templates and presets live: inside the installed wheel, or in the source tree.

A wheel carries `schemas/` and `templates/` under `dpoc/_data/` (pyproject force-include); a source checkout
has them at the repository root. Presets always live in the package.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]


@cache
def data_dir(name: str) -> Path:
    """`schemas` or `templates`, wherever this installation keeps them."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"dpoc installation is missing its {name}/ directory")


def schema_path(kind: str) -> Path:
    return data_dir("schemas") / f"{kind}.schema.json"


def preset_dir(kind: str) -> Path:
    """`models` or `hardware`."""
    return _PACKAGE / "presets" / kind


def preset_names(kind: str) -> list[str]:
    return sorted(p.stem for p in preset_dir(kind).glob("*.yaml"))
