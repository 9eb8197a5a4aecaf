"""Dotted paths into nested mappings (`hardware.env.HCCL_CONNECT_TIMEOUT`): the one way recipe keys,
provenance records and plan.json values are named."""

from __future__ import annotations

from typing import Any


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The leaves of `tree` by dotted path; a list or an empty mapping is one leaf."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def paths(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """Every dotted key of `tree`, sections and leaves alike."""
    out = []
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        out.append(path)
        if isinstance(value, dict):
            out.extend(paths(value, path))
    return out
