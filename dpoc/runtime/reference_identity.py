"""Which reference model a run compares against, recorded in every checkpoint and checked on resume.

A resumed DPO run must keep its reference: `identity` names its source and a content hash. Today the
reference is the seeded random init (`checkpoint.init: random`): its content is a pure function of the seed
and the architecture, so the hash covers exactly those.
"""

from __future__ import annotations

import argparse
import hashlib
import json

from dpoc import megatron_args


def identity(args: argparse.Namespace) -> dict[str, str]:
    source = f"seeded-init:seed={args.seed}"
    text = source + "\n" + json.dumps(megatron_args.architecture(args), sort_keys=True)
    return {"source": source, "sha256": hashlib.sha256(text.encode()).hexdigest()}
