"""The contracts' JSON Schemas (`schemas/`): Draft 2020-12 checks, rewritten into one readable line per problem.

`recipes/x.yaml: training.global_batch_size: must be an integer (got '64k')`. Unknown keys get a
"did you mean". Schemas are compiled once per process.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from dpoc.contract import resources
from dpoc.contract.errors import DpocError, Problem, foreign_name, suggest

SCHEMA_KINDS = ("recipe", "model", "hardware", "plan", "preprocess")

# recipe keys dpoc once had, and why they went: an old recipe that sets one learns why, not just "unknown key"
REMOVED_RECIPE_KEYS = {
    "parallelism.moe_mc2": "no target can express it: MindSpeed's MC2 fuses tensor-parallel linear layers with their "
    "communication and does not apply to MoE models with grouped GEMM, and MindSpeed-RL's DPO config has no field "
    "for it",
}


@cache
def schema(kind: str) -> dict[str, Any]:
    return json.loads(resources.schema_path(kind).read_text())


def _uri(kind: str) -> str:
    """A schema's file name is its URI: the shipped schemas have no `$id`, so a relative `$ref`
    (`model.schema.json#/$defs/architecture`) names the sibling file, and standard tools (check-jsonschema,
    yaml-language-server) resolve it offline from wherever the schemas lie."""
    return resources.schema_path(kind).name


@cache
def _registry():
    from referencing import Registry, Resource

    return Registry().with_resources((_uri(k), Resource.from_contents(schema(k))) for k in SCHEMA_KINDS)


@cache
def _validator(kind: str):
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema(kind), registry=_registry())


def check(kind: str, instance: Any, file: str, prefix: str = "") -> list[Problem]:
    """Schema problems of `instance` against schema `kind`, each naming its dotted field."""
    from jsonschema.exceptions import best_match

    problems = []
    for error in sorted(_validator(kind).iter_errors(instance), key=lambda e: list(map(str, e.absolute_path))):
        if error.context:  # oneOf/anyOf: report the branch that came closest
            error = best_match(error.context)
        problems.extend(_describe(error, file, prefix, kind))
    return list(dict.fromkeys(problems))  # jsonschema reports `required` once per missing key


def require(kind: str, instance: Any, file: str, prefix: str = "") -> None:
    problems = check(kind, instance, file, prefix)
    if problems:
        raise DpocError(problems)


def _field(path, prefix: str) -> str:
    parts = [prefix] if prefix else []
    parts += [str(p) for p in path]
    return ".".join(parts) or "(top level)"


def _describe(error, file: str, prefix: str, kind_of_schema: str) -> list[Problem]:
    where = _field(error.absolute_path, prefix)
    kind, value = error.validator, error.instance
    if kind in ("additionalProperties", "unevaluatedProperties"):
        allowed = sorted(_allowed_keys(error.schema, _registry().resolver(_uri(kind_of_schema))))
        known = set(allowed)
        out = []
        for key in sorted(k for k in value if k not in known):
            field = f"{where}.{key}" if where != "(top level)" else key
            removed = REMOVED_RECIPE_KEYS.get(field) if kind_of_schema == "recipe" else None
            if removed:
                out.append(Problem(file, field, f"unknown key: removed, because {removed}; remove the key"))
            else:
                hint = foreign_name(key) or suggest(key, allowed)
                out.append(Problem(file, field, f"unknown key ({hint}valid: {', '.join(allowed)})"))
        return out
    if kind == "required":
        missing = [k for k in error.validator_value if k not in value]
        return [Problem(file, f"{where}.{k}" if where != "(top level)" else k, "is required") for k in missing]
    return [Problem(file, where, _message(kind, error.validator_value, value))]


def _message(kind: str, expected: Any, value: Any) -> str:
    got = f"got {value!r}"
    if kind == "enum":
        return f"must be one of {', '.join(map(repr, expected))} ({got})"
    if kind == "const":
        return f"must be {expected!r} ({got})"
    if kind == "type":
        names = expected if isinstance(expected, list) else [expected]
        return f"must be {' or '.join(_TYPE_WORDS.get(n, n) for n in names)} ({got})"
    if kind in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        words = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
        return f"must be {words[kind]} {expected} ({got})"
    if kind == "minLength":
        return f"must not be empty ({got})"
    if kind == "minItems":
        return f"needs at least {expected} item(s) ({got})"
    if kind == "uniqueItems":
        return f"must not repeat items ({got})"
    if kind == "pattern":
        return f"has characters that are not allowed ({got}; must match {expected})"
    return f"is not valid ({kind} {expected!r}; {got})"


_TYPE_WORDS = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
               "object": "a mapping", "array": "a list", "null": "null"}


def _allowed_keys(node: dict[str, Any], resolver) -> set[str]:
    """Property names a schema node accepts, following `$ref` and `allOf` (for did-you-mean)."""
    keys = set(node.get("properties", {}))
    if "$ref" in node:
        resolved = resolver.lookup(node["$ref"])
        keys |= _allowed_keys(resolved.contents, resolved.resolver)
    for sub in node.get("allOf", []):
        keys |= _allowed_keys(sub, resolver)
    return keys
