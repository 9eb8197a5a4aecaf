"""The docs stay true to the code: every path and link they name exists, and the contracts docs/design.md
states (the layer table, recipe keys, Plan fields, run and checkpoint file names, metrics keys, the checkpoint
record, exit codes, `--dpoc-*` flags, the build directory's files) equal what the code defines and what
`dpoc build` writes. Fast: runtime modules are read with `ast`, never imported, so no torch is loaded.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest

from dpoc.cli import EXTERNAL, main
from dpoc.contract import errors, runs

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "design.md"
DOCS = ["README.md", "CONTRIBUTING.md", "docs/design.md", "dpoc/runtime/README.md", "dpoc/data/README.md"]
REPO_ROOTS = ("dpoc/", "tests/", "bench/", "schemas/", "recipes/", "templates/", "docs/", ".ci/")
NOT_A_PATH = re.compile(r"[<>{}*\s$]")
NOT_YET_WRITTEN = {REPO / "docs" / "devices.md"}  # linked from design.md; another change writes it
NOT_MODULES = {"dpoc.rng_state"}  # a checkpoint's object key (dpoc/runtime/README.md), not a module


def _block(name: str) -> str:
    """The text of docs/design.md between `<!-- name: begin -->` and `<!-- name: end -->`."""
    match = re.search(rf"<!-- {name}: begin -->\n(.*?)<!-- {name}: end -->", DESIGN.read_text(), re.S)
    assert match, f"docs/design.md lost its {name} block"
    return match.group(1)


def _rows(name: str) -> list[list[str]]:
    """A markdown table's body rows, cells stripped of spaces and backticks."""
    lines = [line for line in _block(name).splitlines() if line.startswith("|")][2:]
    return [[cell.strip().replace("`", "") for cell in line.strip("|").split("|")] for line in lines]


def _named_paths(doc: str) -> list[str]:
    """Repository paths a doc names in backticks: from the root, or (a package README) from its own folder."""
    here = (REPO / doc).parent
    found = []
    for token in re.findall(r"`([^`\n]+)`", (REPO / doc).read_text()):
        token = token.split(" ")[0].rstrip(".,:;")
        if NOT_A_PATH.search(token) or token.startswith(("-", "/", "..")):
            continue
        if token.startswith(REPO_ROOTS) or token in ("README.md", "CONTRIBUTING.md", "pyproject.toml"):
            found.append(token)
        elif doc.startswith("dpoc/") and re.fullmatch(r"[a-z_]+/[a-z_]+\.py", token):
            found.append(str((here / token).relative_to(REPO)))
    return found


@pytest.mark.parametrize("doc", DOCS)
def test_every_path_a_doc_names_exists(doc):
    assert (REPO / doc).exists()
    assert [p for p in _named_paths(doc) if not (REPO / p).exists()] == []


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_a_doc_has_exists(doc):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (REPO / doc).read_text())
    targets = [((REPO / doc).parent / link).resolve() for link in links if "://" not in link]
    assert [str(p) for p in targets if not p.exists() and p not in NOT_YET_WRITTEN] == []


def _module_exists(dotted: str) -> bool:
    """`dpoc.a.b` names a module or package, or an attribute of the module `dpoc.a`."""
    parts = dotted.split(".")
    module = REPO / "/".join(parts)
    return module.with_suffix(".py").exists() or module.is_dir() or module.parent.with_suffix(".py").exists()


@pytest.mark.parametrize("doc", DOCS)
def test_every_dpoc_module_a_doc_names_exists(doc):
    modules = sorted(set(re.findall(r"`(dpoc(?:\.[a-z_]+)+)", (REPO / doc).read_text())))
    assert [m for m in modules if m not in NOT_MODULES and not _module_exists(m)] == []


def test_the_layer_table_is_the_architecture_tests():
    spec = importlib.util.spec_from_file_location("architecture", REPO / "tests" / "test_architecture.py")
    architecture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(architecture)
    table = {row[0]: set() if row[2] == "(nothing)" else {p.strip() for p in row[2].split(",")}
             for row in _rows("layers")}
    assert table == architecture.MAY_IMPORT


def test_every_shared_file_name_is_in_the_design():
    names = {k: v for k, v in vars(runs).items() if k.isupper() and isinstance(v, str)}
    assert names, "dpoc/contract/runs.py names no files"
    text = DESIGN.read_text()
    assert {k: v for k, v in names.items() if f"`{v}`" not in text or f"`{k}`" not in text} == {}
    assert f"`{runs.folder_name(0).replace('0000000', 'NNNNNNN')}/`" in text


def _python_exit_codes() -> set[int]:
    """Exit codes the `dpoc` command returns: literal returns and conditional values in the CLI, the modules it
    hands whole subcommands to, and the launcher's supervisor."""
    paths = [*sorted((REPO / "dpoc" / "cli").glob("*.py")), REPO / "dpoc" / "launch" / "job.py",
             *(REPO / (module.replace(".", "/") + ".py") for module, _ in EXTERNAL.values())]
    codes = {0, errors.EXIT_USER_ERROR, errors.EXIT_PREEMPTED}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            values = [node.value] if isinstance(node, ast.Return) else [node.body, node.orelse] \
                if isinstance(node, ast.IfExp) else []
            codes |= {v.value for v in values if isinstance(v, ast.Constant) and type(v.value) is int}
    return codes


def _script_exit_codes() -> set[int]:
    """Literal `exit N` in the templates' shell code (comment lines left out)."""
    codes = set()
    for path in sorted((REPO / "templates").glob("*.j2")):
        code = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        codes |= {int(n) for n in re.findall(r"\bexit (\d+)\b", code)}
    return codes


def test_every_exit_code_is_documented():
    documented = {int(n) for row in _rows("exit-codes") for n in re.findall(r"\d+", row[0])}
    assert _python_exit_codes() - documented == set()
    assert _script_exit_codes() - documented == set()
    assert {129, 130, 143} <= _script_exit_codes()  # the scan above sees the traps


def _schema_keys(schema: dict, section: str) -> set[str]:
    """What a recipe section takes: its own keys and those of the schema it refers to (`model`, `hardware`,
    `parallelism`), or the values of an enum (`runtime`) or a constant (`parallelism: auto`)."""
    body = schema["properties"][section]
    keys = set(body.get("enum", ())) | {body.get("then", {}).get("const")} - {None}
    body = body.get("else", body)
    keys |= set(body.get("properties", {}))
    if "$ref" in body:
        file, _, pointer = body["$ref"].partition("#")
        target = json.loads((REPO / "schemas" / file).read_text()) if file else schema
        for part in pointer.strip("/").split("/"):
            target = target[part]
        keys |= set(target.get("properties", {}))
    return keys


def test_every_recipe_section_and_key_is_named():
    schema = json.loads((REPO / "schemas" / "recipe.schema.json").read_text())
    sections = re.findall(r"^- `([a-z_]+)`: (.*?)(?=^- |\Z)", _block("recipe-sections"), re.M | re.S)
    assert sorted(name for name, _ in sections) == sorted(schema["properties"])
    for name, text in sections:
        named = set(re.findall(r"`([a-z_][a-z0-9_-]*)`", re.sub(r"\([^()]*\)", "", text)))  # parentheses: prose
        assert named == _schema_keys(schema, name), name


def test_the_plan_fields_are_the_dataclasses():
    import dataclasses

    from dpoc.contract import architecture, plan

    for line in re.findall(r"^- (.*?)(?=^- |\Z)", _block("plan-fields"), re.M | re.S):
        name = re.match(r"`(\w+)`", line).group(1)
        cls = getattr(plan, name, None) or getattr(architecture, name)
        listed = re.findall(r"`(\w+)`", re.split(r"\):\s+", line)[-1])
        assert listed == [f.name for f in dataclasses.fields(cls)], name
    classes = {m.group(1) for m in re.finditer(r"^- `(\w+)`", _block("plan-fields"), re.M)}
    nested = {f.type.split(" ")[0] for f in dataclasses.fields(plan.Plan) if f.type[0].isupper()}
    assert nested - classes == set()


def _literal(path: Path, name: str):
    """A module-level constant of a file that imports torch, read without importing it."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                elements = target.elts if isinstance(target, ast.Tuple) else [target]
                values = node.value.elts if isinstance(target, ast.Tuple) else [node.value]
                for element, value in zip(elements, values, strict=True):
                    if isinstance(element, ast.Name) and element.id == name:
                        return ast.literal_eval(value)
    raise AssertionError(f"{path} lost {name}")


def test_the_metrics_keys_are_the_runtimes():
    dpo = REPO / "dpoc" / "runtime" / "step" / "dpo.py"
    keys = set(_literal(dpo, "REWARD_KEYS")) | {k for extra in _literal(dpo, "EXTRA_KEYS").values() for k in extra}
    popped = set()
    for node in ast.walk(ast.parse((REPO / "dpoc" / "runtime" / "train.py").read_text())):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "log.step":  # the row it writes
            keys |= {k.value for k in node.args[0].keys if isinstance(k, ast.Constant)}
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "record.pop":  # taken out before logging
            popped.add(node.args[0].value)
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]).startswith("record["):  # record["fill"]
            keys.add(node.targets[0].slice.value)
    keys -= popped
    assert "step" in keys and "fill" in keys and "tokens" not in keys
    import torch

    from dpoc.runtime.losses.kto import SUM_KEYS, kto_record

    keys |= set(kto_record(torch.ones(1, len(SUM_KEYS)), 1))  # a step with desirable and undesirable completions
    assert set(re.findall(r"`([a-z_/]+)`", _block("metrics"))) - {"cpo", "simpo", "orpo", "kto", "dpo.loss"} == keys


def test_the_checkpoint_record_is_the_runtimes():
    tree = ast.parse((REPO / "dpoc" / "runtime" / "checkpoint" / "save_load.py").read_text())
    records = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "records")
    returned = next(n.value for n in ast.walk(records) if isinstance(n, ast.Return))
    written = {k.value for k in returned.keys}
    assert set(re.findall(r"`(\w+)`", _block("checkpoint-record"))) - {"interval", "end", "preempted"} == written


def test_the_dpoc_flags_are_the_parsers():
    source = (REPO / "dpoc" / "contract" / "megatron_args.py").read_text()
    assert set(re.findall(r"`(--dpoc-[a-z-]+)`", _block("dpoc-flags"))) == set(re.findall(r'"(--dpoc-[a-z-]+)"', source))


def _file_rows() -> list[tuple[re.Pattern, str | None, str]]:
    """The build-files table: (regex of the path, its target or None for render, when)."""
    rows = []
    for path, by, when, _ in _rows("build-files"):
        pattern = re.compile(re.sub(r"<[a-z_]+>", "[^/]+", re.escape(path).replace(r"\<", "<").replace(r"\>", ">")))
        rows.append((pattern, by.removesuffix(" target") if by.endswith(" target") else None, when))
    return rows


BUILDS = {  # between them: every row of the table written, and each target once skipped
    "tiny_cpu": ["recipes/tiny_cpu.yaml"],
    "guide": ["recipes/qwen3_30b.yaml"],
    "guide_a2": ["recipes/qwen3_30b_a2.yaml"],
    "precomputed": ["recipes/tiny_cpu.yaml", "dpo.reference=precomputed"],
    "converted": ["recipes/qwen3_30b.yaml", "checkpoint.init=converted"],
    "mindspeed_cp2": ["recipes/qwen3_30b.yaml", "runtime=mindspeed-rl", "parallelism.cp=2"],
    "mindspeed_only": ["recipes/qwen3_30b.yaml", "runtime=mindspeed-rl", "parallelism.moe_tp_extend_ep=true"],
}


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, tuple[set[str], set[str]]]:
    """Each build's written files and skipped targets (`dpoc build` in-process, from the repository root)."""
    out = {}
    for name, (recipe, *overrides) in BUILDS.items():
        target = tmp_path_factory.mktemp("build") / name
        assert main(["build", str(REPO / recipe), *overrides, "-o", str(target)]) == 0
        written = {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()}
        out[name] = written, set(json.loads((target / "manifest.json").read_text())["skipped_targets"])
    return out


@pytest.mark.parametrize("name", BUILDS)
def test_the_build_file_table_is_what_a_build_writes(builds, name):
    written, skipped = builds[name]
    rows = _file_rows()
    assert sorted(f for f in written if not any(p.fullmatch(f) for p, _, _ in rows)) == []
    for pattern, target, when in rows:
        present = any(pattern.fullmatch(f) for f in written)
        if when == "always" or (when == "target renders" and target not in skipped):
            assert present, f"{pattern.pattern} ({when}) was not written"
        elif target in skipped:
            assert not present, f"{pattern.pattern}: its target {target} was skipped"


def test_the_builds_write_every_row_and_skip_each_target(builds):
    written = set().union(*(files for files, _ in builds.values()))
    assert [p.pattern for p, _, _ in _file_rows() if not any(p.fullmatch(f) for f in written)] == []
    assert set().union(*(skipped for _, skipped in builds.values())) == {"dpoc", "mindspeed-rl"}


def test_the_runtime_readme_names_every_runtime_module():
    readme = (REPO / "dpoc" / "runtime" / "README.md").read_text()
    modules = sorted(str(p.relative_to(REPO / "dpoc" / "runtime")) for p in (REPO / "dpoc" / "runtime").rglob("*.py")
                     if p.name != "__init__.py")
    assert [m for m in modules if f"`{m}`" not in readme] == []
