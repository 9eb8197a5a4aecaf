"""The shipped schemas work with standard tools, offline: check-jsonschema (the real CLI) and the editors'
`# yaml-language-server: $schema=` header resolve every `$ref` to a sibling file, never to the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import RECIPES, REPO

SCHEMAS = REPO / "schemas"
GOLDEN = REPO / "tests/golden"
PRESETS = REPO / "dpoc/presets"
# a proxy nobody listens on: any download attempt fails at once instead of silently succeeding
OFFLINE = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}


def check_jsonschema(schema: str, *files: Path) -> subprocess.CompletedProcess:
    tool = Path(sys.executable).parent / "check-jsonschema"
    return subprocess.run([str(tool), "--no-cache", "--schemafile", str(SCHEMAS / f"{schema}.schema.json"),
                           *map(str, files)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **OFFLINE})


SHIPPED = {  # schema -> the shipped files it describes
    "recipe": sorted(RECIPES.glob("*.yaml")),
    "plan": sorted(GOLDEN.glob("*/plan.json")),
    "preprocess": sorted(GOLDEN.glob("*/preprocess.yaml")),
    "model": sorted(PRESETS.glob("models/*.yaml")),
    "hardware": sorted(PRESETS.glob("hardware/*.yaml")),
}


@pytest.mark.parametrize("schema", SHIPPED)
def test_check_jsonschema_accepts_the_shipped_files_offline(schema):
    assert SHIPPED[schema]
    proc = check_jsonschema(schema, *SHIPPED[schema])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "ok -- validation done"


def test_check_jsonschema_rejects_an_unknown_key(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text((RECIPES / "tiny_cpu.yaml").read_text().replace("  lr: 1.0e-3\n", "  lrr: 1.0e-3\n"))
    proc = check_jsonschema("recipe", recipe)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Schema validation errors were encountered." in proc.stdout
    assert "'lrr' was unexpected" in proc.stdout


def test_schemas_name_their_references_as_sibling_files():
    """No `$id`: a relative `$ref` then names the file next to the schema, wherever the schemas lie."""
    for path in sorted(SCHEMAS.glob("*.schema.json")):
        text = path.read_text()
        assert "$id" not in json.loads(text), path.name
        refs = [ln.split('"$ref": "', 1)[1].split("#", 1)[0] for ln in text.splitlines() if '"$ref": "' in ln]
        assert all((SCHEMAS / ref).is_file() for ref in refs if ref), (path.name, refs)


def test_each_recipe_header_points_editors_at_the_recipe_schema():
    for recipe in sorted(RECIPES.glob("*.yaml")):
        first = recipe.read_text().splitlines()[0]
        assert first == "# yaml-language-server: $schema=../schemas/recipe.schema.json", recipe.name
        assert (recipe.parent / first.split("=", 1)[1]).resolve() == SCHEMAS / "recipe.schema.json"


def test_every_provenance_source_the_resolver_writes_is_in_the_plan_schema(tmp_path, monkeypatch):
    """A plan built from HF weights (sources hf:config.json), with a command-line override (user:command line)
    and a hostfile (user:hostfile ...), validates with check-jsonschema, as every golden plan does."""
    from dpoc.compiler.pipeline import build
    from tests.compiler.test_hf_config import RECIPE, write_config

    monkeypatch.chdir(tmp_path)
    write_config(tmp_path)
    (tmp_path / "hosts").write_text("10.0.0.1 slots=2\n")
    (tmp_path / "r.yaml").write_text(RECIPE.replace("hardware: {", "hardware: {hostfile: hosts, "))
    plan, out = build("r.yaml", ["training.lr=2.0e-4"], out=tmp_path / "b")
    sources = {s.source.split(":")[0] + (":" if ":" in s.source else "") for _, s in plan.provenance}
    assert {"hf:", "user", "user:", "preset:", "derived:", "default"} <= sources
    proc = check_jsonschema("plan", out / "plan.json", *SHIPPED["plan"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
