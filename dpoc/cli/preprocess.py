"""`dpoc preprocess CONFIG.yaml [flags]` or `dpoc preprocess --input ... --tokenizer ... [flags]`.

Flags override the config file's keys; `--show N` prints how the first N rows render (prompt/response
boundary marked) and writes nothing. Kept import-light: the heavy work is imported inside `run`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dpoc.contract.errors import DpocError, Problem
from dpoc.data.config import LAYOUTS, MAP_KEYS, TEMPLATES

# flags that override the config key of the same name
_OVERRIDES = ("input", "format", "layout", "tokenizer", "template", "enable_thinking", "map_keys",
              "seq_length", "truncate", "output_prefix", "workers", "skip_bad_lines", "unpaired")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="preprocessing config (schemas/preprocess.schema.json)")
    parser.add_argument("--input", help="JSON Lines, JSON array or Parquet file")
    parser.add_argument("--format", choices=["auto", "jsonl", "json", "parquet"])
    parser.add_argument("--layout", choices=LAYOUTS)
    parser.add_argument("--tokenizer", help="Hugging Face tokenizer directory")
    parser.add_argument("--template", choices=TEMPLATES)
    parser.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--map-keys", metavar="FIELD=COLUMN,...",
                        help='column mapping, e.g. "prompt=question,query=,system=system" '
                             f'(fields: {", ".join(MAP_KEYS)})')
    parser.add_argument("--seq-length", type=int)
    parser.add_argument("--truncate", choices=["prompt", "response"])
    parser.add_argument("--output-prefix")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--skip-bad-lines", action="store_true", default=None)
    parser.add_argument("--unpaired", action="store_true", default=None,
                        help="write the unpaired dataset KTO trains on (pairs split in two, as TRL's "
                             "unpair_preference_dataset)")
    parser.add_argument("--show", type=int, metavar="N", default=0,
                        help="print the rendered text of the first N rows and exit without writing")


def run(args: argparse.Namespace) -> int:
    from dpoc.data.config import build_config, read_config_file

    values: dict[str, Any] = read_config_file(args.config) if args.config else {}
    source = args.config or "command line"
    for key in _OVERRIDES:
        value = getattr(args, key)
        if value is not None:
            values[key] = _parse_map_keys(value) if key == "map_keys" else value
    if args.config is None and not values:
        raise DpocError([Problem("command line", "config", "give a config file or --input, --tokenizer, "
                                 "--output-prefix and --seq-length")])
    config = build_config(values, source)
    if args.show:
        from dpoc.data.show import show

        show(config, args.show, sys.stdout)
        return 0
    from dpoc.data.pipeline import preprocess

    stats = preprocess(config)
    prefix = config.output_prefix
    print(f"{prefix}: {stats.summary()}; wrote {prefix}_packed_*_document.{{bin,idx}}, {prefix}_stats.json")
    return 0


def _parse_map_keys(text: str) -> dict[str, str]:
    mapping = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        field, sep, column = item.partition("=")
        if not sep:
            raise DpocError([Problem("command line", "--map-keys", f"{item!r} is not FIELD=COLUMN (fields: "
                                     f"{', '.join(MAP_KEYS)}; an empty COLUMN disables the field)")])
        mapping[field.strip()] = column.strip()
    return mapping
