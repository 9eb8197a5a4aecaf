"""Node preflight: checks that need the node's own files, run by each node script before torchrun.

The compiler never touches cluster paths (resolve is pure); this is where they are checked: the build is
intact (files match manifest.json), the dataset, tokenizer and initial weights exist, and on resume the
checkpoint is there. Exit 2 with one line per problem.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dpoc.errors import DpocError, Problem

DATASET_PARTS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
TRACKER = "latest_checkpointed_iteration.txt"


def preflight(build_dir: str | Path, mode: str) -> None:
    build = Path(build_dir)
    problems: list[Problem] = []
    manifest_path = build / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise DpocError([Problem(str(manifest_path), "(file)", f"cannot read the build's manifest: {exc}")]) from None
    for rel, digest in manifest["files"].items():
        path = build / rel
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            problems.append(Problem(str(path), "(file)", "differs from manifest.json: the build was edited or is "
                                    "incomplete; rebuild it with dpoc build"))
    plan = json.loads((build / "plan.json").read_text())
    data, ck = plan["data"], plan["checkpoint"]
    for part in DATASET_PARTS:
        for ext in ("bin", "idx"):
            path = Path(f"{data['output_prefix']}_packed_{part}_document.{ext}")
            if not path.is_file():
                problems.append(Problem(str(path), "(file)", "missing preprocessed dataset; run "
                                        f"{build / 'preprocess.sh'} first"))
                break
    if not Path(data["tokenizer"]).is_dir():
        problems.append(Problem(data["tokenizer"], "(directory)", "tokenizer directory not found on this node"))
    if mode == "resume":
        if not (Path(ck["save"]) / TRACKER).is_file():
            problems.append(Problem(ck["save"], TRACKER, "no checkpoint to resume from; valid: DPOC_RESUME=0"))
    else:
        for key in ("load", "ref_model"):
            if ck[key] is not None and not Path(ck[key]).is_dir():
                problems.append(Problem(ck[key], "(directory)", f"checkpoint.{key} not found on this node; run "
                                        f"{build / 'convert' / 'hf_to_mcore.sh'} first"))
    if problems:
        raise DpocError(list(dict.fromkeys(problems)))
