"""The compiler pipeline in one place: load → validate → resolve → render → write. `dpoc build` and friends call it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dpoc.compiler.load import LoadedRecipe, load_recipe
from dpoc.compiler.resolve.resolver import resolve
from dpoc.compiler.validate import validate
from dpoc.contract import schemas
from dpoc.contract.errors import DpocError, Problem
from dpoc.contract.plan import Plan


def load_and_check(recipe: str | Path, overrides: Sequence[str] = ()) -> LoadedRecipe:
    """Load, then validate the recipe and the presets merged into it against their schemas."""
    loaded = load_recipe(recipe, overrides)
    validate(loaded)
    return loaded


def plan_recipe(recipe: str | Path, overrides: Sequence[str] = ()) -> Plan:
    """The Plan of a recipe, as its default build has it. plan.json's schema validity is the compiler's own
    promise, checked in the tests for every shipped recipe rather than at every build."""
    loaded = load_and_check(recipe, overrides)
    return resolve(loaded, _build_name(loaded, default_build_dir(recipe)))


def default_build_dir(recipe: str | Path) -> Path:
    return Path("build") / Path(recipe).stem


def build(recipe: str | Path, overrides: Sequence[str] = (), out: str | Path | None = None) -> tuple[Plan, Path]:
    """Build into `out` (default build/<recipe file stem>); the build is named after that directory."""
    from dpoc.compiler.render.render import manifest, render
    from dpoc.compiler.write import write_tree

    target = Path(out) if out is not None else default_build_dir(recipe)
    loaded = load_and_check(recipe, overrides)
    plan = resolve(loaded, _build_name(loaded, target))
    files = render(plan)
    files["manifest.json"] = manifest(plan, files)
    write_tree(target, files)
    return plan, target


def _build_name(loaded: LoadedRecipe, target: Path) -> str:
    """The build directory's name, which names the build unless the recipe sets `name` (then it must be one)."""
    import os
    import re

    name = os.path.basename(os.path.abspath(target))
    pattern = schemas.schema("recipe")["properties"]["name"]["pattern"]
    if "name" not in loaded.data and not re.fullmatch(pattern, name):
        raise DpocError([Problem("command line", "-o", f"the build directory's name {name!r} cannot name the build "
                                 f"(valid: a name matching {pattern}, or set name=...)")])
    return name
