"""Load: recipe YAML + named presets + `key=value` overrides → one plain dict, with where each value came from.

OmegaConf does the merging, dotlist parsing and `${...}` interpolation. This is the only compiler stage that
reads files (the recipe, presets, an optional hostfile, and the weights' config.json when the recipe names
weights but no architecture); everything after it is pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dpoc import resources
from dpoc.errors import DpocError, Problem, suggest

# recipe section -> preset catalog it names
PRESET_SECTIONS = {"model": "models", "hardware": "hardware"}
HF_CONFIG_SOURCE = "hf:config.json"  # provenance of model fields read from the weights' config.json


@dataclass(frozen=True)
class LoadedRecipe:
    path: str  # as the user gave it; used in every error message
    name: str
    data: dict[str, Any]
    sources: dict[str, str]  # dotted leaf path -> "user" | "user:command line" | "preset:<name>" | "hf:config.json"


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> LoadedRecipe:
    shown = str(path)
    recipe = _read_yaml(Path(path), shown)
    if not isinstance(recipe, dict):
        raise DpocError([Problem(shown, "(top level)", "a recipe is a mapping of sections (model, hardware, ...)")])
    cli = _parse_overrides(overrides, shown)

    sources = {k: "user" for k in _leaves(recipe)}
    sources.update({k: "user:command line" for k in _leaves(cli)})
    merged = _auto_layout(_merge(_auto_layout(recipe), cli))

    for section, catalog in PRESET_SECTIONS.items():
        body = merged.get(section)
        if isinstance(body, dict) and isinstance(body.get("preset"), str):
            preset = read_preset(catalog, body["preset"], shown, f"{section}.preset")
            merged[section] = _merge(preset, body)
            for key in _leaves(preset):
                sources.setdefault(f"{section}.{key}", f"preset:{body['preset']}")

    data = _interpolate(merged, shown)
    model = data.get("model")
    if isinstance(model, dict) and _architecture_from_weights(model):
        config_arch = read_hf_architecture(model["hf_weights"], shown)
        data["model"] = _merge(config_arch, model)
        for key in _leaves(config_arch):
            sources.setdefault(f"model.{key}", HF_CONFIG_SOURCE)

    hostfile = (data.get("hardware") or {}).get("hostfile") if isinstance(data.get("hardware"), dict) else None
    if isinstance(hostfile, str):
        data["hardware"]["hosts"] = read_hostfile(Path(hostfile), data["hardware"], shown)
        sources["hardware.hosts"] = f"user:hostfile {hostfile}"

    name = data.get("name") if isinstance(data.get("name"), str) else Path(path).stem
    return LoadedRecipe(shown, name, data, sources)


def _architecture_from_weights(model: dict[str, Any]) -> bool:
    """A model section with weights but neither a preset nor a whole inline architecture: config.json says it."""
    from dpoc.validate import schema

    return ("preset" not in model and isinstance(model.get("hf_weights"), str)
            and not all(key in model for key in schema("model")["required"]))


def read_hf_architecture(hf_weights: str, recipe_file: str) -> dict[str, Any]:
    """The model section from `<hf_weights>/config.json` (plain json: no torch, no transformers)."""
    from dpoc import hf_config
    from dpoc.family import HF_MODEL_TYPE

    try:
        config = hf_config.read_config(hf_weights, "model.hf_weights", recipe_file)
    except DpocError as exc:
        first = exc.problems[0]
        raise DpocError([Problem(recipe_file, "model.hf_weights", f"{first.message}; give model.preset (or the "
                                 "architecture inline), or make the file readable")]) from None
    arch = hf_config.architecture(config, hf_config.config_path(hf_weights))
    return {**arch, "mindspeed_name": hf_config.mindspeed_name(hf_weights),
            "hf_model_type": HF_MODEL_TYPE[arch["family"]]}


def read_preset(catalog: str, name: str, recipe_file: str, field: str) -> dict[str, Any]:
    path = resources.preset_dir(catalog) / f"{name}.yaml"
    if not path.is_file():
        known = resources.preset_names(catalog)
        hint = suggest(name, known)
        raise DpocError([Problem(recipe_file, field, f"unknown preset {name!r} ({hint}valid: {', '.join(known)})")])
    data = _read_yaml(path, str(path))
    return data if isinstance(data, dict) else {}


def read_hostfile(path: Path, hardware: dict[str, Any], recipe_file: str) -> list[str]:
    """Parse `ip slots=N` lines (comments with #); slots must equal devices per node."""
    shown = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DpocError([Problem(recipe_file, "hardware.hostfile", f"cannot read {shown}: {exc.strerror}")]) from None
    hosts, problems = [], []
    per_node = hardware.get("devices_per_node")
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        host, *rest = line.split()
        slots = next((r.split("=", 1)[1] for r in rest if r.startswith("slots=")), None)
        if slots is not None and (not slots.isdigit() or (per_node is not None and int(slots) != per_node)):
            problems.append(Problem(shown, f"line {lineno}",
                                    f"slots={slots} does not match {per_node} devices per node of the hardware preset"))
        hosts.append(host)
    if not hosts and not problems:
        problems.append(Problem(shown, "line 1", "no hosts (expected lines of `ip slots=N`)"))
    if problems:
        raise DpocError(problems)
    return hosts


@cache
def _yaml_loader():
    """PyYAML's safe loader (libyaml when present) reading exponent floats such as `5e-8` as numbers, as
    OmegaConf and Hydra do (YAML 1.1 would read a string); plain data, no DictConfig to build."""
    import re

    import yaml

    class RecipeLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        pass

    RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                       re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                       list("-+0123456789"))
    return RecipeLoader


def _read_yaml(path: Path, shown: str) -> Any:
    import yaml

    try:
        return yaml.load(path.read_text(), Loader=_yaml_loader())
    except FileNotFoundError:
        raise DpocError([Problem(shown, "(file)", "no such file")]) from None
    except Exception as exc:  # yaml.YAMLError carries the line in its text
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(file)"
        raise DpocError([Problem(shown, where, f"not valid YAML: {getattr(exc, 'problem', exc)}")]) from None


def _parse_overrides(overrides: Sequence[str], shown: str) -> dict[str, Any]:
    problems = [Problem(shown, o, "an override is key=value, e.g. training.lr=1e-7") for o in overrides if "=" not in o]
    if problems:
        raise DpocError(problems)
    if not overrides:
        return {}
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=False)
    except OmegaConfBaseException as exc:
        raise DpocError([Problem(shown, "(command line)", f"bad override: {exc.msg}")]) from None


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, mappings merged key by key (OmegaConf.merge's semantics for plain data)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def _interpolate(tree: dict[str, Any], shown: str) -> dict[str, Any]:
    """Resolve `${...}` interpolations with OmegaConf, when the recipe uses any."""
    if "${" not in repr(tree):
        return tree
    try:
        return OmegaConf.to_container(OmegaConf.create(tree), resolve=True)
    except OmegaConfBaseException as exc:
        where = getattr(exc, "full_key", None) or "(interpolation)"
        raise DpocError([Problem(shown, str(where), f"cannot resolve interpolation: {exc.msg}")]) from None


def _auto_layout(tree: dict[str, Any]) -> dict[str, Any]:
    """`parallelism: auto` is an empty layout, so that `parallelism.tp=2` can pin one knob of it."""
    return {**tree, "parallelism": {}} if tree.get("parallelism") == "auto" else tree


def _leaves(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        out = []
        for key, value in tree.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            out.extend(_leaves(value, path) if isinstance(value, dict) and value else [path])
        return out
    return [prefix] if prefix else []
