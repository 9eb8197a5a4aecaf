"""Paths that seem to name another model or layout than the Plan's.

Switching `model.preset`, or letting the planner choose the layout, keeps the recipe's tokenizer and weight
paths: `checkpoint.mindspeed_load: ./model_weights/Qwen3-30B-TP2-PP8-EP1` after `parallelism=auto` chose tp4 ep4
would make MindSpeed-RL load per-rank weights converted for another layout (dpoc's distributed checkpoints load
at any layout: only their model is compared). Pure, like the rest of resolve: the path's text is read, never the
disk — a model tag (`Qwen3-30B-A3B`, `Llama-3.1-70B`) and layout tags (`TP2-PP8-EP1`) are compared with the Plan.
"""

from __future__ import annotations

import re

from dpoc.compiler.resolve.rules import Violation
from dpoc.contract.plan import Plan
from dpoc.planner.layout import layout_tag

# family, version, size in billions: qwen3-30b-a3b, Qwen2.5-7B-Instruct, Meta-Llama-3.1-70B, llama3-8b
_MODEL = re.compile(r"(?<![a-z])(qwen|llama)[-_.]?(\d+(?:\.\d+)?)?[-_.]*?(\d+(?:\.\d+)?)b(?![a-z0-9])", re.I)
_KNOB = re.compile(r"(?<![a-z])(tp|pp|vpp|cp|ep|etp)[-_]?(\d+)(?!\d)", re.I)

# Plan path -> the recipe field a user edits; which paths name the layout as well as the model (MindSpeed-LLM's
# per-rank weights: dpoc's distributed checkpoints load at any layout)
_PATHS = {"checkpoint.hf_weights": "model.hf_weights", "data.tokenizer": "model.tokenizer",
          "checkpoint.load": "checkpoint.load", "checkpoint.ref_model": "checkpoint.ref_model",
          "checkpoint.mindspeed_load": "checkpoint.mindspeed_load",
          "checkpoint.mindspeed_ref_model": "checkpoint.mindspeed_ref_model"}
_PER_RANK = ("checkpoint.mindspeed_load", "checkpoint.mindspeed_ref_model")


def model_tag(text: str) -> tuple[str, str, str] | None:
    """(family, version, size) of the last model name in `text`; None when it names none."""
    found = _MODEL.findall(text)
    if not found:
        return None
    family, version, size = found[-1]
    return family.lower(), version, size


def layout_tags(text: str) -> dict[str, int]:
    """The parallel degrees `text` names (`TP2-PP8-EP1` → tp 2, pp 8, ep 1); the last mention of each wins."""
    return {knob.lower(): int(value) for knob, value in _KNOB.findall(text)}


def check(plan: Plan) -> list[Violation]:
    """A warning for each path the recipe gave that names another model or layout than the Plan's."""
    planned = model_tag(plan.model.name)
    out = []
    for path, field in _PATHS.items():
        section, key = path.split(".")
        value = getattr(getattr(plan, section), key)
        if not value or not plan.source_of(path).source.startswith("user"):
            continue
        named = model_tag(value)
        if planned and named and not _same_model(named, planned):
            out.append(Violation(field, f"{value} seems to name a {_model_words(named)} model, but the model is "
                                 f"{plan.model.name} (kept from another model.preset?)", warning=True))
        if path in _PER_RANK:
            tags = layout_tags(value)
            if any(getattr(plan.layout, k) != n for k, n in tags.items()):
                named_layout = " ".join(f"{k}{n}" for k, n in tags.items())
                actual = " ".join(f"{k}{getattr(plan.layout, k)}" for k in tags)
                out.append(Violation(field, f"{value} seems to name {named_layout}, but "
                                     f"the layout is {actual} (kept from another layout?); valid: weights "
                                     "converted for this layout (mindspeed-rl/convert/hf_to_mcore.sh), e.g. "
                                     f"./model_weights/{plan.name}-{layout_tag(plan.layout)}", warning=True))
    return out


def _same_model(a: tuple[str, str, str], b: tuple[str, str, str]) -> bool:
    """Same family and size; versions agree when one refines the other (`llama3` presets serve Llama-3.1)."""
    (family_a, version_a, size_a), (family_b, version_b, size_b) = a, b
    versions_agree = not version_a or not version_b or f"{version_a}.".startswith(f"{version_b}.") \
        or f"{version_b}.".startswith(f"{version_a}.")
    return family_a == family_b and float(size_a) == float(size_b) and versions_agree


def _model_words(tag: tuple[str, str, str]) -> str:
    family, version, size = tag
    return f"{family.capitalize()}{version} {size}B"
