"""`layout: auto`: what the config leaves out, read from the file's first rows, where the data is.

Never from the file's name: the chosen column's shape decides the layout (`fields.fitting_layout`), and the
first rows must agree. For the layouts that read a prompt column, an unmapped prompt whose default column
(`instruction`) is absent is read from `prompt` or `question`, and an unmapped `system` column is read when
the rows have one. A config that names its layout gets exactly MindSpeed-RL's semantics instead.
"""

from __future__ import annotations

import dataclasses

from dpoc.contract.errors import DpocError, Problem
from dpoc.data.config import PreprocessConfig
from dpoc.data.fields import DEFAULT_COLUMNS, LAYOUTS, BadRow, columns_for, fitting_layout
from dpoc.data.readers import Source, decode, read_chunks

SAMPLE_ROWS = 16
PROMPT_COLUMNS = ("prompt", "question")  # tried in order when `instruction` is absent


def settle(config: PreprocessConfig, source: Source) -> PreprocessConfig:
    """The config with a concrete layout and the detected columns; unchanged unless its layout is auto."""
    if config.layout != "auto":
        return config
    chunk = next(iter(read_chunks(source, SAMPLE_ROWS)), None)
    seen = []  # (where, layout, record) of the first rows that can be read (bad ones are reported later)
    for row in chunk.rows if chunk else []:
        try:
            record = decode(row)
        except BadRow:
            continue
        seen.append((row.where, fitting_layout(record, config.map_keys), record))
    fits = [(where, fit, record) for where, fit, record in seen if fit is not None]
    if not fits:
        raise DpocError([_undetectable(config, seen)])
    first = {}  # layout -> the first row that has it
    for where, fit, _ in fits:
        first.setdefault(fit, where)
    if len(first) > 1:
        found = ", ".join(f"{where}: {fit}" for fit, where in first.items())
        raise DpocError([Problem(config.source, "layout", f"auto: the first rows of {config.input} mix layouts "
                                 f"({found}); valid: set layout: {' | '.join(LAYOUTS)}")])
    layout, record = fits[0][1], fits[0][2]
    return dataclasses.replace(config, layout=layout, map_keys=_columns(config, layout, record))


def _columns(config: PreprocessConfig, layout: str, record: dict) -> dict[str, str]:
    keys = dict(config.map_keys)
    if layout == "hh-rlhf":  # the transcripts hold the whole prompt
        return keys
    found = next((c for c in PROMPT_COLUMNS if c in record), None)
    if "prompt" not in keys and DEFAULT_COLUMNS["prompt"] not in record and found:
        keys["prompt"] = found
    if "system" not in keys and "system" in record:
        keys["system"] = "system"
    return keys


def _undetectable(config: PreprocessConfig, seen: list) -> Problem:
    chosen = columns_for(config.map_keys)["chosen"]
    if not seen:
        why = f"none of its first {SAMPLE_ROWS} rows can be read"
    else:
        where, _, record = seen[0]
        columns = ", ".join(sorted(map(str, record))) if isinstance(record, dict) else type(record).__name__
        why = f'its rows have no column "{chosen}" holding the chosen response ({where}: {columns})'
    return Problem(config.source, "layout", f"auto: cannot tell the layout of {config.input}: {why}; valid: "
                   "map_keys.chosen and map_keys.rejected naming the response columns, or layout: "
                   + "; ".join(f"{name} ({what})" for name, what in LAYOUTS.items()))
