"""The docs stay true to the code: every path they name exists, and the contracts docs/design.md states (the
layer table, run and checkpoint file names, exit codes, recipe sections, `--dpoc-*` flags, the build
directory's files) equal what the code defines and what `dpoc build` writes. Fast: no torch is imported.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest

from dpoc.cli import main
from dpoc.contract import errors, runs

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "design.md"
DOCS = ["README.md", "CONTRIBUTING.md", "docs/design.md", "dpoc/runtime/README.md", "dpoc/data/README.md"]
REPO_ROOTS = ("dpoc/", "tests/", "bench/", "schemas/", "recipes/", "templates/", "docs/", ".ci/")
NOT_A_PATH = re.compile(r"[<>{}*\s$]")
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


def _cli_exit_codes() -> set[int]:
    codes = {0, errors.EXIT_USER_ERROR, errors.EXIT_PREEMPTED}
    for path in sorted((REPO / "dpoc" / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant) and type(node.value.value) is int:
                codes.add(node.value.value)
            if isinstance(node, ast.IfExp) and all(isinstance(v, ast.Constant) for v in (node.body, node.orelse)):
                codes |= {v.value for v in (node.body, node.orelse) if type(v.value) is int}
    return codes


def test_every_exit_code_the_cli_uses_is_documented():
    documented = {int(row[0]) for row in _rows("exit-codes") if row[0].isdigit()}
    assert _cli_exit_codes() - documented == set()


def test_every_recipe_section_is_named():
    schema = json.loads((REPO / "schemas" / "recipe.schema.json").read_text())
    named = set(re.findall(r"^- `([a-z_]+)`", _block("recipe-sections"), re.M))
    assert named == set(schema["properties"])


def test_the_dpoc_flags_are_the_parsers():
    source = (REPO / "dpoc" / "contract" / "megatron_args.py").read_text()
    assert set(re.findall(r"`(--dpoc-[a-z-]+)`", _block("dpoc-flags"))) == set(re.findall(r'"(--dpoc-[a-z-]+)"', source))


def _patterns() -> list[tuple[re.Pattern, bool]]:
    """The build-files table as (regex of its path, written always)."""
    return [(re.compile(re.sub(r"<[a-z_]+>", "[^/]+", re.escape(row[0]).replace(r"\<", "<").replace(r"\>", ">"))),
             row[2] == "always") for row in _rows("build-files")]


@pytest.mark.parametrize("build", [["recipes/tiny_cpu.yaml"], ["recipes/qwen3_30b.yaml"],
                                   ["recipes/tiny_cpu.yaml", "dpo.reference=precomputed"]])
def test_the_build_file_table_is_what_a_build_writes(tmp_path, build, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "b"
    assert main(["build", *build, "-o", str(out)]) == 0
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    patterns = _patterns()
    assert [f for f in written if not any(p.fullmatch(f) for p, _ in patterns)] == []
    assert [p.pattern for p, always in patterns if always and not any(p.fullmatch(f) for f in written)] == []
