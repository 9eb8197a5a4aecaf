"""`--show N`: the first N rows as the model will see them, decoded from the very token ids written."""

from __future__ import annotations

from itertools import islice
from typing import TextIO

from dpoc.data.config import PreprocessConfig
from dpoc.data.detect import settle
from dpoc.data.encode import PairEncoder
from dpoc.data.readers import open_source, read_chunks

_RULE = "─" * 72
_START, _END = "▶", "◀"


def show(config: PreprocessConfig, count: int, out: TextIO) -> None:
    source = open_source(config.input, config.format, config.source)
    settled = settle(config, source)
    if config.layout == "auto":
        keys = ", ".join(f"{k}={v}" for k, v in sorted(settled.map_keys.items())) or "the defaults"
        out.write(f"{config.input}: layout {settled.layout} (detected from the first rows), map_keys {keys}\n")
    config = settled
    rows = next(iter(read_chunks(source, count)), None)
    encoder = PairEncoder(config)
    decode = encoder.tokenizer.decode
    for outcome in islice(encoder.encode(rows.rows if rows else []), count):
        out.write(f"{_RULE}\n{config.input}: {outcome.where}: ")
        if outcome.example is not None:
            ex, n = outcome.example, outcome.example.prompt_length
            out.write(f"prompt {n} tokens (labels -100), completion +{len(ex.ids) - n}, "
                      f"{'desirable' if ex.desirable else 'undesirable'}{' (truncated)' if ex.truncated else ''}\n"
                      f"{decode(ex.ids[:n].tolist())}{_START}{decode(ex.ids[n:].tolist())}{_END}\n")
            continue
        if outcome.pair is None:
            reasons = {"empty": "dropped: empty prompt or response",
                       "too_long": f"dropped: a sequence reaches seq_length {config.seq_length}"}
            reason = outcome.problem or reasons[outcome.dropped]
            out.write(f"{reason}\n")
            continue
        pair, n = outcome.pair, outcome.pair.prompt_length
        out.write(f"prompt {n} tokens (labels -100), chosen +{len(pair.chosen) - n}, rejected "
                  f"+{len(pair.rejected) - n}{' (truncated)' if pair.truncated else ''}; "
                  f"{_START} marks where the labels start, {_END} the end\n")
        for side, ids in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            out.write(f"[{side}]\n{decode(ids[:n].tolist())}{_START}{decode(ids[n:].tolist())}{_END}\n")
    out.write(f"{_RULE}\n")
