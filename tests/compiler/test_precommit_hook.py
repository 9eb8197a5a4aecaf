"""The `dpoc-validate` pre-commit hook: its entry, run as pre-commit runs it, on the files its pattern picks."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import RECIPES, REPO

(HOOK,) = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())


def run_hook(*files: Path) -> subprocess.CompletedProcess:
    """pre-commit runs `entry` with the staged files that match `files` appended, from the repository root."""
    command, *args = shlex.split(HOOK["entry"])
    executable = Path(sys.executable).parent / command  # the console script pip installs with dpoc
    return subprocess.run([str(executable), *args, *map(str, files)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_hook_is_dpoc_validate_on_recipe_files():
    assert (HOOK["id"], HOOK["entry"], HOOK["language"]) == ("dpoc-validate", "dpoc validate", "python")
    pattern = re.compile(HOOK["files"])
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    picked = [f for f in tracked if pattern.search(f)]
    assert picked == sorted(str(p.relative_to(REPO)) for p in RECIPES.glob("*.yaml"))  # not presets, goldens
    assert pattern.search("jobs/recipes/llama.yml") and not pattern.search("recipes/notes.md")


def test_hook_entry_passes_the_shipped_recipes_and_fails_a_bad_one(tmp_path):
    recipes = sorted(p.relative_to(REPO) for p in RECIPES.glob("*.yaml"))
    good = run_hook(*recipes)
    assert good.returncode == 0, good.stderr
    assert good.stdout.splitlines() == [f"{r}: ok" for r in recipes]
    bad = tmp_path / "recipes" / "bad.yaml"
    bad.parent.mkdir()
    bad.write_text((RECIPES / "qwen3_30b.yaml").read_text().replace("  tp: 2\n", "  tp: 3\n"))
    failed = run_hook(recipes[0], bad)
    assert failed.returncode == 2
    assert failed.stdout == f"{recipes[0]}: ok\n"
    assert f"{bad}: parallelism.tp: tp=3: 32 attention heads and 4 KV heads need tp in {{1, 2, 4}}" in failed.stderr
    assert "Traceback" not in failed.stderr
