"""Every shipped preset and recipe validates, and the preset numbers match the published architectures."""

from __future__ import annotations

import math

import pytest
import yaml

from dpoc.compiler.pipeline import plan_recipe
from dpoc.contract import resources, schemas
from dpoc.contract.specs import preset_model
from dpoc.runtime.weights.weight_map import hf_tensors
from tests.conftest import RECIPES

MODELS = resources.preset_names("models")
HARDWARE = resources.preset_names("hardware")


def test_catalog_is_complete():
    assert sorted(["qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b", "qwen3-32b",
                             "qwen3-30b-a3b", "qwen3-235b-a22b", "qwen2.5-7b", "qwen2.5-32b", "llama3-8b",
                             "llama3-70b", "tiny-qwen3", "tiny-qwen3-moe"]) == MODELS
    assert HARDWARE == ["atlas-a2", "atlas-a3", "cpu"]


@pytest.mark.parametrize("name", MODELS)
def test_model_preset_validates(name):
    data = yaml.safe_load((resources.preset_dir("models") / f"{name}.yaml").read_text())
    assert schemas.check("model", data, name) == []


@pytest.mark.parametrize("name", HARDWARE)
def test_hardware_preset_validates(name):
    data = yaml.safe_load((resources.preset_dir("hardware") / f"{name}.yaml").read_text())
    assert schemas.check("hardware", data, name) == []


# published totals (hardware-and-models.md §5), in billions, to the precision given there
PUBLISHED = {"qwen3-0.6b": 0.596, "qwen3-1.7b": 1.72, "qwen3-4b": 4.02, "qwen3-8b": 8.19, "qwen3-14b": 14.77,
             "qwen3-32b": 32.76, "qwen3-30b-a3b": 30.53, "qwen3-235b-a22b": 235.1, "qwen2.5-7b": 7.62,
             "qwen2.5-32b": 32.76, "llama3-8b": 8.03, "llama3-70b": 70.55}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_matches_published_parameter_count(name):
    params = sum(math.prod(shape) for shape in hf_tensors(preset_model(name)).values())
    assert params / 1e9 == pytest.approx(PUBLISHED[name], rel=0.01)


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipe_validates_and_plans(recipe):
    data = yaml.safe_load(recipe.read_text())
    assert schemas.check("recipe", data, recipe.name) == []
    plan = plan_recipe(recipe)
    assert schemas.check("plan", plan.to_dict(), "plan.json") == []
    lay = plan.layout
    assert lay.world_size % (lay.tp * lay.pp * lay.cp) == 0 and lay.world_size % (lay.etp * lay.ep * lay.pp) == 0


def test_a2_recipe_is_the_published_layout():
    lay = plan_recipe(RECIPES / "qwen3_30b_a2.yaml").layout
    assert (lay.world_size, lay.tp, lay.pp, lay.dp, lay.ep, lay.num_microbatches) == (16, 2, 8, 1, 1, 64)


def test_inline_model_needs_no_preset(tmp_path):
    arch = yaml.safe_load((resources.preset_dir("models") / "tiny-qwen3.yaml").read_text())
    recipe = yaml.safe_load((RECIPES / "tiny_cpu.yaml").read_text())
    recipe["model"] = {**arch, "num_layers": 6, "tokenizer": "./tok"}
    path = tmp_path / "inline.yaml"
    path.write_text(yaml.safe_dump(recipe))
    plan = plan_recipe(path)
    assert plan.model.name == "inline" and plan.model.num_layers == 6
    assert plan.source_of("model.num_layers").source == "user"
