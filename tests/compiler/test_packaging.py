"""A non-editable install carries its schemas, templates and presets and works from any directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import RECIPES, REPO


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)], check=True,
                   capture_output=True, timeout=300)
    (wheel,) = out.glob("dpoc-*.whl")
    site = out / "site"
    zipfile.ZipFile(wheel).extractall(site)
    return site


@pytest.mark.slow
def test_wheel_ships_data_files(wheel_dir):
    names = {str(p.relative_to(wheel_dir)) for p in wheel_dir.rglob("*") if p.is_file()}
    assert {"dpoc/_data/schemas/recipe.schema.json", "dpoc/_data/schemas/plan.schema.json",
            "dpoc/_data/templates/node.sh.j2", "dpoc/presets/models/qwen3-30b-a3b.yaml",
            "dpoc/presets/hardware/atlas-a3.yaml"} <= names


def test_installed_package_builds_from_another_directory(wheel_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(wheel_dir)}
    proc = subprocess.run([sys.executable, "-m", "dpoc", "build", str(RECIPES / "qwen3_30b.yaml"), "-o",
                           str(tmp_path / "b")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "b/nodes/node-1.sh").is_file()
    check = subprocess.run([sys.executable, "-c", "import dpoc.contract.resources as r; print(r.data_dir('templates'))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert check.stdout.strip() == str(wheel_dir / "dpoc/_data/templates")


def test_installed_validator_follows_its_schema_refs(wheel_dir, tmp_path):
    """The schemas' relative `$ref`s resolve inside the wheel too (an unknown key under model needs model.schema)."""
    env = {**os.environ, "PYTHONPATH": str(wheel_dir)}
    proc = subprocess.run([sys.executable, "-m", "dpoc", "validate", str(RECIPES / "tiny_cpu.yaml"), "--set",
                           "model.hidden=64"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"{RECIPES / 'tiny_cpu.yaml'}: model.hidden: unknown key (did you mean "
                                  "'hidden_size'? valid: ")
