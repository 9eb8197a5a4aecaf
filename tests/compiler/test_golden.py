"""Golden builds: every shipped recipe's build, byte for byte. A change to any default shows up as a diff here.

Regenerate after an intended change (and review the diff):  DPOC_UPDATE_GOLDEN=1 python -m pytest tests/compiler/test_golden.py
"""

from __future__ import annotations

import os
import shutil

import pytest

from dpoc.compiler.pipeline import build
from tests.conftest import RECIPES, REPO

GOLDEN = REPO / "tests" / "golden"


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_build_matches_golden(recipe, tmp_path):
    out = tmp_path / recipe.stem
    build(recipe, out=out)
    golden = GOLDEN / recipe.stem
    if os.environ.get("DPOC_UPDATE_GOLDEN"):
        shutil.rmtree(golden, ignore_errors=True)
        shutil.copytree(out, golden)
    produced = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    expected = {str(p.relative_to(golden)): p.read_bytes() for p in sorted(golden.rglob("*")) if p.is_file()}
    assert sorted(produced) == sorted(expected)
    for name, data in produced.items():
        assert data == expected[name], f"{recipe.stem}/{name} differs from tests/golden (regenerate: see module doc)"
