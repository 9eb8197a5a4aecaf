"""The compiler pipeline in one place: load → validate → resolve → render. `dpoc build` and friends call it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dpoc import validate
from dpoc.errors import DpocError
from dpoc.load import LoadedRecipe, load_recipe
from dpoc.plan import Plan
from dpoc.resolve import resolve

RECIPE_ONLY_KEYS = {"model": ("preset", "hf_weights", "tokenizer"),
                    "hardware": ("preset", "hosts", "hostfile", "master_addr", "master_port")}


def load_and_check(recipe: str | Path, overrides: Sequence[str] = ()) -> LoadedRecipe:
    """Load, then validate the recipe and the presets merged into it against their schemas."""
    loaded = load_recipe(recipe, overrides)
    problems = validate.check("recipe", loaded.data, loaded.path)
    if not problems:
        for section, kind in (("model", "model"), ("hardware", "hardware")):
            body = {k: v for k, v in loaded.data[section].items() if k not in RECIPE_ONLY_KEYS[section]}
            problems += validate.check(kind, body, loaded.path, prefix=section)
    if problems:
        raise DpocError(problems)
    return loaded


def plan_recipe(recipe: str | Path, overrides: Sequence[str] = ()) -> Plan:
    """The Plan of a recipe. plan.json's schema validity is the compiler's own promise, checked in the tests for
    every shipped recipe rather than at every build."""
    return resolve(load_and_check(recipe, overrides))


def build(recipe: str | Path, overrides: Sequence[str] = (), out: str | Path | None = None) -> tuple[Plan, Path]:
    from dpoc.build import write_tree
    from dpoc.render import manifest, render

    plan = plan_recipe(recipe, overrides)
    files = render(plan)
    files["manifest.json"] = manifest(plan, files)
    target = Path(out) if out is not None else Path("build") / Path(recipe).stem
    write_tree(target, files)
    return plan, target
