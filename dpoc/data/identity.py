"""What a preprocessed dataset was made from, and the check that it is what a build expects.

`dpoc preprocess` records its settings in `{prefix}_stats.json` (with a fingerprint of the tokenizer's
files and the input's size); the node preflight (against the build's `preprocess.yaml`) and the runtime
(against its `--seq-length` and `--tokenizer-name-or-path`) refuse a dataset made with other settings, so
one build's preprocess.sh can never silently feed another build's training. A dataset without the stats
file (MindSpeed-LLM writes none) is accepted with a warning. Import-light: the preflight uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from dpoc.contract.errors import Problem

# preprocessing config keys that decide what the dataset holds (not: workers, format, output_prefix, ...)
SETTINGS = ("input", "layout", "tokenizer", "template", "enable_thinking", "map_keys", "seq_length", "truncate",
            "unpaired")
# the files of a Hugging Face tokenizer directory that decide tokenization (never the weights next to them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja",
                   "chat_template.json")


def tokenizer_sha256(directory: str) -> str | None:
    """One digest over the tokenizer files present in `directory`; None when it is not a directory."""
    if not os.path.isdir(directory):
        return None
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                digest.update(name.encode() + b"\0" + hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """What a preprocessing config (a PreprocessConfig's fields or a build's preprocess.yaml) makes, as it
    can be seen here: its settings, the tokenizer's fingerprint and the input's size (None where absent)."""
    out = {key: dict(config[key]) if key == "map_keys" else config[key] for key in SETTINGS if key != "unpaired"}
    out["unpaired"] = bool(config.get("unpaired", False))  # a build's preprocess.yaml names it only when true
    input_path = config["input"]
    out["tokenizer_sha256"] = tokenizer_sha256(config["tokenizer"])
    out["input_bytes"] = os.path.getsize(input_path) if os.path.isfile(input_path) else None
    return out


def check(prefix: str, expected: Mapping[str, Any], rebuild: str) -> tuple[list[Problem], list[str]]:
    """(problems, warnings) of the dataset at `prefix` against the settings a build expects. Keys missing
    from `expected` or None there are not compared (the runtime knows only some; a file may be absent)."""
    from dpoc.data.pairwise import stats_path

    path = stats_path(prefix)
    if not os.path.isfile(path):
        return [], [f"{prefix}: no {os.path.basename(path)} (a dataset preprocessed by MindSpeed-LLM?): its length "
                    "statistics are unknown, and its tokenizer, template and seq_length cannot be checked against "
                    "this build"]
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f).get("settings")
    except (OSError, ValueError) as exc:
        return [Problem(path, "(file)", f"cannot read the dataset's stats ({exc}); {rebuild}")], []
    if not isinstance(recorded, dict):
        return [Problem(path, "(file)", f"records no preprocessing settings (an older dpoc wrote it); {rebuild}")], []
    found = differences(recorded, expected)
    if not found:
        return [], []
    return [Problem(path, "(dataset)", f"was preprocessed with {'; '.join(found)}: another build's "
                    f"preprocess.sh (or an older config) wrote it; {rebuild}, or give this build its own "
                    "dataset.output_prefix")], []


def differences(recorded: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """`seq_length 32 (this build: 256)` for every setting that differs; the tokenizer by its files."""
    out = []
    for key in (*SETTINGS, "input_bytes"):
        want, got = expected.get(key), recorded.get(key, False if key == "unpaired" else None)
        if key == "tokenizer":
            want, got = expected.get("tokenizer_sha256"), recorded.get("tokenizer_sha256")
            then, now = recorded.get(key), expected.get(key)
            if want is not None and want != got and then == now:
                out.append(f"tokenizer {then} as its files were then (they have changed)")
            elif want is not None and want != got:
                out.append(f"tokenizer {then} (this build: {now}, whose files differ)")
        elif key == "input":
            if want is not None and os.path.normpath(want) != os.path.normpath(str(got)):
                out.append(f"input {got} (this build: {want})")
        elif key == "input_bytes":
            if want is not None and want != got:
                out.append(f"an input of {got} bytes (now {want})")
        elif want is not None and want != got:
            out.append(f"{key} {_plain(got)} (this build: {_plain(want)})")
    return out


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v!r}" for k, v in sorted(value.items())) + "}"
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)
