"""Stage 2: a loaded recipe, and the presets merged into it, against their JSON Schemas (`contract.schemas`).

Every problem of every section is reported together; nothing is resolved from a recipe that fails here.
"""

from __future__ import annotations

from dpoc.compiler.load import LoadedRecipe
from dpoc.contract import schemas
from dpoc.contract.errors import DpocError

# recipe keys that only the recipe has: the model and hardware schemas describe the presets' bodies
RECIPE_ONLY_KEYS = {"model": ("preset", "hf_weights", "tokenizer"),
                    "hardware": ("preset", "hosts", "hostfile", "master_addr", "master_port")}


def validate(loaded: LoadedRecipe) -> None:
    problems = schemas.check("recipe", loaded.data, loaded.path)
    if not problems:
        for section, kind in (("model", "model"), ("hardware", "hardware")):
            body = {k: v for k, v in loaded.data[section].items() if k not in RECIPE_ONLY_KEYS[section]}
            problems += schemas.check(kind, body, loaded.path, prefix=section)
    if problems:
        raise DpocError(problems)
