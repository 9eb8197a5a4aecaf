"""An SVG chart of per-device memory per pipeline stage, stacked by what holds it (no plotting library)."""

from __future__ import annotations

from html import escape

from dpoc.planner.memory import GIB, MemoryEstimate
from dpoc.planner.report import PARTS

COLORS = ("#4e79a7", "#a0cbe8", "#f28e2b", "#ffbe7d", "#59a14f", "#8cd17d", "#b6992d", "#f1ce63", "#86bcb6",
          "#bab0ac")


def memory_svg(memory: MemoryEstimate, title: str) -> str:
    bar, gap, left, top, height = 36, 14, 60, 40, 320
    stages = memory.stages
    width = max(left + len(stages) * (bar + gap) + 190, left + 7 * len(title))
    scale = height / max(memory.capacity, memory.peak.total)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + height + 50}" '
           'font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="20" font-size="13">{escape(title)}</text>']
    for gib in range(0, int(max(memory.capacity, memory.peak.total) / GIB) + 1, 8):
        y = top + height - gib * GIB * scale
        out.append(f'<line x1="{left - 4}" x2="{left + len(stages) * (bar + gap)}" y1="{y:.1f}" y2="{y:.1f}" '
                   'stroke="#ddd"/>')
        out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{gib}</text>')
    cap_y = top + height - memory.capacity * scale
    out.append(f'<line x1="{left - 4}" x2="{left + len(stages) * (bar + gap)}" y1="{cap_y:.1f}" y2="{cap_y:.1f}" '
               'stroke="#c00" stroke-dasharray="4 3"/>')
    for i, stage in enumerate(stages):
        x, y = left + i * (bar + gap), top + height
        for part, color in zip(PARTS, COLORS, strict=True):
            h = getattr(stage, part) * scale
            y -= h
            out.append(f'<rect x="{x}" y="{y:.1f}" width="{bar}" height="{h:.1f}" fill="{color}">'
                       f'<title>stage {stage.stage} {part}: {getattr(stage, part) / GIB:.2f} GiB</title></rect>')
        out.append(f'<text x="{x + bar / 2}" y="{top + height + 14}" text-anchor="middle">{stage.stage}</text>')
    out.append(f'<text x="{left}" y="{top + height + 32}">pipeline stage (GiB per device; dashed: capacity)</text>')
    lx = left + len(stages) * (bar + gap) + 20
    for k, (part, color) in enumerate(zip(PARTS, COLORS, strict=True)):
        out.append(f'<rect x="{lx}" y="{top + 16 * k}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{lx + 16}" y="{top + 16 * k + 9}">{part.replace("_", " ")}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
