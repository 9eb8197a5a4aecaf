"""Stage 2: a loaded recipe, and the presets merged into it, against their JSON Schemas (`contract.schemas`).

Every problem of every section, and every file the recipe names that load could not read, is reported
together; nothing is resolved from a recipe that fails here.
"""

from __future__ import annotations

from dpoc.compiler.load import LoadedRecipe
from dpoc.contract import schemas
from dpoc.contract.errors import DpocError

# recipe keys that only the recipe has: the model and hardware schemas describe the presets' bodies
RECIPE_ONLY_KEYS = {"model": ("preset", "hf_weights", "tokenizer"),
                    "hardware": ("preset", "hosts", "hostfile", "master_addr", "master_port")}


def validate(loaded: LoadedRecipe) -> None:
    """The schema problems, with the files the recipe names that load could not read (a model whose config.json
    could not be read is not checked against the model schema: its architecture is what is missing)."""
    problems = schemas.check("recipe", loaded.data, loaded.path)
    unread = {p.where for p in loaded.problems}
    if not problems:
        for section, kind in (("model", "model"), ("hardware", "hardware")):
            if f"{section}.hf_weights" in unread:
                continue
            body = {k: v for k, v in loaded.data[section].items() if k not in RECIPE_ONLY_KEYS[section]}
            problems += schemas.check(kind, body, loaded.path, prefix=section)
    problems = [*loaded.problems, *problems]
    if problems:
        raise DpocError(problems)
