"""`dpoc explain`: every resolved value of the Plan, where it came from, and why."""

from __future__ import annotations

import json

from dpoc.contract.plan import Plan, plan_values


def explain(plan: Plan) -> str:
    flat = plan_values(plan.to_dict())
    flat.pop("warnings", None)  # listed below, one per line
    rows = []
    for path, value in sorted(flat.items()):
        src = plan.source_of(path)
        note = f"  ({src.why})" if src.why else ""
        rows.append((path, json.dumps(value, ensure_ascii=False), src.source, note))
    width = max(len(r[0]) for r in rows)
    vwidth = min(max(len(r[1]) for r in rows), 40)
    lines = [f"{p:<{width}}  {v:<{vwidth}}  {s}{n}" for p, v, s, n in rows]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines) + "\n"
