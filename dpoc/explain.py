"""`dpoc explain`: every resolved value of the Plan, where it came from, and why."""

from __future__ import annotations

import json

from dpoc.plan import Plan


def explain(plan: Plan) -> str:
    flat = _flatten(plan.to_dict())
    flat.pop("provenance", None)
    rows = []
    for path, value in sorted(flat.items()):
        if path.startswith("provenance."):
            continue
        src = plan.source_of(path)
        note = f"  ({src.why})" if src.why else ""
        rows.append((path, json.dumps(value, ensure_ascii=False), src.source, note))
    width = max(len(r[0]) for r in rows)
    vwidth = min(max(len(r[1]) for r in rows), 40)
    lines = [f"{p:<{width}}  {v:<{vwidth}}  {s}{n}" for p, v, s, n in rows]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines) + "\n"


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value and key not in ("map_keys", "env", "moe"):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out
