"""The device check (one process of its group, `dpoc.runtime.device_check.main`) with rank 1 made to disagree
with its peers for real, for test_device_check.py, as batch_driver.py runs it (`main(argv)`):

    python -m tests.runtime.device_check_skew HOW ARGS_FILE REPORT_DIR

HOW is `seed`: rank 1 seeds the runtime's RNG path (`initialize_parallel`) with the run's seed + 1, so its
weights are not its peers'; or `norm`: rank 1 scales its copy of the final norm's weight by 1.01 once the layer
is built. The patch is undone when the check returns (the launch's next run is untouched).
"""

from __future__ import annotations

import copy
import os

import torch

from dpoc.contract.check_group import REPORT_ENV
from dpoc.runtime import device_check


def _seed_apart(original):
    def initialize_parallel(args):
        if int(os.environ["RANK"]) == 1:
            args = copy.copy(args)
            args.seed += 1
        return original(args)

    return initialize_parallel


def _norm_apart(original):
    def build_chunks(config, args):
        chunks = original(config, args)
        if int(os.environ["RANK"]) == 1:
            with torch.no_grad():
                chunks[0].decoder.final_layernorm.weight.mul_(1.01)
        return chunks

    return build_chunks


PATCHES = {"seed": ("initialize_parallel", _seed_apart), "norm": ("build_chunks", _norm_apart)}


def main(argv: list[str]) -> int:
    how, args_file, report = argv
    name, patch = PATCHES[how]
    original = getattr(device_check, name)
    setattr(device_check, name, patch(original))
    os.environ[REPORT_ENV] = report
    try:
        return device_check.main([args_file, "--devices", "2"])
    finally:
        setattr(device_check, name, original)
