"""Targets: the programs a Plan can be rendered for. Each declares which knobs it can express.

The recipe's `runtime:` picks the target the node scripts launch; a knob it cannot express is an error.
Every other target is rendered too when it can express the Plan, else left out with the reason.
"""

from __future__ import annotations

from types import ModuleType

from dpoc.compiler.render.targets import dpoc_runtime, mindspeed_rl
from dpoc.contract.errors import DpocError, Problem

TARGETS: dict[str, ModuleType] = {"dpoc": dpoc_runtime, "mindspeed-rl": mindspeed_rl}


def get(name: str) -> ModuleType:
    if name not in TARGETS:
        raise DpocError([Problem("recipe", "runtime", f"unknown target {name!r}; valid: {', '.join(TARGETS)}")])
    return TARGETS[name]
