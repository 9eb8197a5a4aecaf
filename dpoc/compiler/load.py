"""Load: recipe YAML + named presets + `key=value` / `~key` overrides → one plain dict, with where each value
came from.

OmegaConf does the merging, dotlist parsing and `${...}` interpolation. This is the only compiler stage that
reads files (the recipe, presets, an optional hostfile, the weights' config.json when the recipe names
weights but no architecture, and the preprocessing stats `training.length_stats` names); everything after it
is pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dpoc.contract import resources
from dpoc.contract.dotted import flatten, paths
from dpoc.contract.errors import DpocError, Problem, suggest

# recipe section -> preset catalog it names
PRESET_SECTIONS = {"model": "models", "hardware": "hardware"}
HF_CONFIG_SOURCE = "hf:config.json"  # provenance of model fields read from the weights' config.json


@dataclass(eq=False, repr=False)  # an intermediate: not frozen, compared by identity, no repr (one method to compile)
class LoadedRecipe:
    """A recipe with its presets and overrides merged, and where each leaf came from."""
    path: str  # as the user gave it; used in every error message
    name: str
    data: dict[str, Any]
    sources: dict[str, str]  # dotted leaf path -> "user" | "user:command line" | "preset:<name>" | "hf:config.json"
    length_stats: Any = None  # the parsed `training.length_stats` file (dpoc.planner.lengths reads it), or None
    # files the recipe names that could not be read: validate reports them with the recipe's other problems
    problems: tuple[Problem, ...] = ()


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> LoadedRecipe:
    shown = str(path)
    recipe = _read_yaml(Path(path), shown)
    if not isinstance(recipe, dict):
        raise DpocError([Problem(shown, "(top level)", "a recipe is a mapping of sections (model, hardware, ...)")])
    merged, sources = _apply_overrides(recipe, overrides, shown)

    for section, catalog in PRESET_SECTIONS.items():
        body = merged.get(section)
        if isinstance(body, dict) and isinstance(body.get("preset"), str):
            preset = read_preset(catalog, body["preset"], shown, f"{section}.preset")
            merged[section] = _merge(preset, body)
            for key in flatten(preset):
                sources.setdefault(f"{section}.{key}", f"preset:{body['preset']}")

    data = _interpolate(merged, shown)
    problems: list[Problem] = []
    model = data.get("model")
    if isinstance(model, dict) and _architecture_from_weights(model):
        try:
            config_arch = read_hf_architecture(model["hf_weights"], shown)
        except DpocError as exc:
            problems += exc.problems
        else:
            data["model"] = _merge(config_arch, model)
            for key in flatten(config_arch):
                sources.setdefault(f"model.{key}", HF_CONFIG_SOURCE)

    hostfile = (data.get("hardware") or {}).get("hostfile") if isinstance(data.get("hardware"), dict) else None
    if isinstance(hostfile, str):
        try:
            data["hardware"]["hosts"] = read_hostfile(Path(hostfile), data["hardware"], shown)
            sources["hardware.hosts"] = f"user:hostfile {hostfile}"
        except DpocError as exc:
            problems += exc.problems
    try:
        length_stats = read_length_stats(data, shown)
    except DpocError as exc:
        problems, length_stats = problems + list(exc.problems), None

    name = data.get("name") if isinstance(data.get("name"), str) else Path(path).stem
    return LoadedRecipe(shown, name, data, sources, length_stats, tuple(problems))


def _from_where(path: str) -> str:
    """How a relative path was read: recipe paths name places in the job's working directory, and the compiler
    takes that to be the directory it runs in."""
    import os

    if os.path.isabs(path):
        return ""
    return f" (a relative path: read from the job's working directory, taken to be this one, {os.getcwd()})"


LENGTHS_PRESET = "preset:"


def read_length_stats(data: dict[str, Any], recipe_file: str) -> Any:
    """The JSON of the `_stats.json` that `training.length_stats` names (None when it names none)."""
    import json

    training = data.get("training")
    path = training.get("length_stats") if isinstance(training, dict) else None
    if not isinstance(path, str):
        return None
    if path.startswith(LENGTHS_PRESET):
        return _length_preset(path, recipe_file)
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise DpocError([Problem(recipe_file, "training.length_stats", f"cannot read {path}: {exc.strerror}"
                                 f"{_from_where(path)} (valid: the {{prefix}}_stats.json that the build's "
                                 "preprocess.sh writes)")]) from None
    except ValueError as exc:
        raise DpocError([Problem(path, "(file)", f"not JSON: {exc}")]) from None


def _length_preset(value: str, recipe_file: str) -> Any:
    """A stated length assumption shipped with dpoc (`preset:NAME`, dpoc/presets/lengths/NAME.json): histograms
    in the `_stats.json` layout, for a recipe whose dataset is not preprocessed yet."""
    import json

    from dpoc.contract.resources import preset_dir

    name, folder = value[len(LENGTHS_PRESET):], preset_dir("lengths")
    names = sorted(p.stem for p in folder.glob("*.json"))
    if name not in names:
        raise DpocError([Problem(recipe_file, "training.length_stats", f"unknown length preset {name!r} (valid: "
                                 f"{', '.join(LENGTHS_PRESET + n for n in names)}, or a _stats.json path)")])
    return json.loads((folder / f"{name}.json").read_text())


def _architecture_from_weights(model: dict[str, Any]) -> bool:
    """A model section with weights but neither a preset nor a whole inline architecture: config.json says it."""
    from dpoc.contract.schemas import schema

    return ("preset" not in model and isinstance(model.get("hf_weights"), str)
            and not all(key in model for key in schema("model")["required"]))


def read_hf_architecture(hf_weights: str, recipe_file: str) -> dict[str, Any]:
    """The model section from `<hf_weights>/config.json` (plain json: no torch, no transformers)."""
    from dpoc.contract import hf_config
    from dpoc.contract.family import HF_MODEL_TYPE

    try:
        config = hf_config.read_config(hf_weights, "model.hf_weights", recipe_file)
    except DpocError as exc:
        first = exc.problems[0]
        raise DpocError([Problem(recipe_file, "model.hf_weights", f"{first.message}{_from_where(hf_weights)}; give "
                                 "model.preset (or the architecture inline), or run dpoc build where the path "
                                 "holds the weights' config.json")]) from None
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
        raise DpocError([Problem(recipe_file, "hardware.hostfile", f"cannot read {shown}: {exc.strerror}"
                                 f"{_from_where(shown)}")]) from None
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


def _apply_overrides(recipe: dict[str, Any], overrides: Sequence[str], shown: str
                     ) -> tuple[dict[str, Any], dict[str, str]]:
    """The recipe with the command line applied in order, as Hydra does: `key=value` sets a key (OmegaConf's
    dotlist syntax), `~key` deletes one, so that the preset's value or the default applies again."""
    tree = _auto_layout(recipe)
    sources = {k: "user" for k in flatten(recipe)}
    problems = []
    for override in overrides:
        if override.startswith("~"):
            problem = _delete(tree, override, shown)
            if problem is None:
                _forget(sources, override[1:])
            else:
                problems.append(problem)
            continue
        if "=" not in override:
            problems.append(Problem(shown, override, "an override is key=value (e.g. training.lr=1e-7), or ~key "
                                    "to delete a key"))
            continue
        try:
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([override]), resolve=False)
        except OmegaConfBaseException as exc:
            problems.append(Problem(shown, "(command line)", f"bad override: {exc.msg}"))
            continue
        for key in flatten(parsed):
            _forget(sources, key)
            sources[key] = "user:command line"
        tree = _auto_layout(_merge(tree, parsed))
    if problems:
        raise DpocError(problems)
    return tree, sources


def _delete(tree: dict[str, Any], override: str, shown: str) -> Problem | None:
    """Delete the key `~a.b.c` names from `tree` in place; else a Problem saying why not and what exists."""
    path = override[1:]
    if not path or "=" in path:
        return Problem(shown, override, "a deletion is ~key alone, e.g. ~hardware.hosts (no value)")
    *parents, last = path.split(".")
    node, depth = tree, 0
    for part in parents:
        if not isinstance(node.get(part), dict):
            break
        node, depth = node[part], depth + 1
    if depth == len(parents) and last in node:
        del node[last]
        return None
    section = tree.get(parents[0]) if parents else None
    if parents and parents[0] in PRESET_SECTIONS and isinstance(section, dict) \
            and isinstance(section.get("preset"), str):
        preset = read_preset(PRESET_SECTIONS[parents[0]], section["preset"], shown, f"{parents[0]}.preset")
        if ".".join([*parents[1:], last]) in paths(preset):
            return Problem(shown, override, f"comes from preset {section['preset']!r}, not the recipe: nothing to "
                           f"delete (set {path}=... to change it)")
    prefix = "".join(f"{p}." for p in parents[:depth])
    return Problem(shown, override, f"the recipe has no such key to delete ({suggest(path, paths(tree))}valid: "
                   f"{', '.join(prefix + k for k in sorted(node))})")


def _forget(sources: dict[str, str], path: str) -> None:
    """Drop the provenance of `path` and everything under it."""
    for key in [k for k in sources if k == path or k.startswith(f"{path}.")]:
        del sources[key]


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
