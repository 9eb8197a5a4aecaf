"""Paths kept from another model or layout: the build warns, naming the field, the path, and what it names."""

from __future__ import annotations

import pytest

from dpoc.compiler.pipeline import plan_recipe
from dpoc.compiler.resolve.stale_paths import layout_tags, model_tag
from tests.conftest import RECIPES

GUIDE = RECIPES / "qwen3_30b.yaml"
EIGHT_HOSTS = "hardware.hosts=[10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5,10.0.0.6,10.0.0.7,10.0.0.8]"


@pytest.mark.parametrize("text, tag", [
    ("./model_from_hf/Qwen3-30B-A3B", ("qwen", "3", "30")),
    ("qwen3-235b-a22b", ("qwen", "3", "235")),
    ("/data/Qwen2.5-7B-Instruct/tokenizer", ("qwen", "2.5", "7")),
    ("./hf/Meta-Llama-3.1-70B-Instruct", ("llama", "3.1", "70")),
    ("llama3-8b", ("llama", "3", "8")),
    ("Qwen3-0.6B", ("qwen", "3", "0.6")),
    ("./assets/tiny/tokenizer", None),
    ("tiny-qwen3-moe", None),
])
def test_model_tag_reads_family_version_and_size(text, tag):
    assert model_tag(text) == tag


def test_layout_tags_read_megatron_style_and_dpoc_style_names():
    assert layout_tags("./model_weights/Qwen3-30B-TP2-PP8-EP1") == {"tp": 2, "pp": 8, "ep": 1}
    assert layout_tags("./model_weights/qwen3_30b-tp4-pp1-ep4-vpp2-tpextendep") == {"tp": 4, "pp": 1, "ep": 4,
                                                                                   "vpp": 2}
    assert layout_tags("./ckpt/step100/deep2") == {}


def test_a_layout_the_planner_changed_warns_about_the_converted_weights():
    plan = plan_recipe(GUIDE, ["parallelism=auto"])
    lay = plan.layout
    assert (lay.tp, lay.pp, lay.ep) != (2, 8, 1)
    stale = [w for w in plan.warnings if "kept from another layout" in w]
    assert stale == [
        f"checkpoint.mindspeed_load: ./model_weights/Qwen3-30B-TP2-PP8-EP1 seems to name tp2 pp8 ep1, but the layout "
        f"is tp{lay.tp} pp{lay.pp} ep{lay.ep} (kept from another layout?); valid: weights converted for this layout "
        f"(mindspeed-rl/convert/hf_to_mcore.sh), e.g. ./model_weights/qwen3_30b-tp{lay.tp}-pp{lay.pp}-ep{lay.ep}"]


def test_the_dpoc_runtimes_converted_weights_load_at_any_layout_whatever_their_name():
    """A distributed checkpoint reshards on load: a layout in its folder name is no reason to warn."""
    plan = plan_recipe(GUIDE, ["parallelism=auto", "checkpoint.load=./model_weights/Qwen3-30B-TP2-PP8-EP1-mcore",
                               "checkpoint.mindspeed_load=./model_weights/per-rank"])
    assert (plan.layout.tp, plan.layout.pp) != (2, 8)
    assert not [w for w in plan.warnings if "kept from another layout" in w]


def test_another_model_preset_warns_about_every_path_naming_the_old_model(dpoc_cli, tmp_path):
    result = dpoc_cli("build", GUIDE, "model.preset=qwen3-235b-a22b", "hardware.nodes=8", EIGHT_HOSTS,
                      "parallelism=auto", "model.tokenizer=./tok/Qwen3-30B-A3B", "-o", tmp_path / "o")
    assert result.code == 0, result.err
    named = [ln for ln in result.err.splitlines() if "seems to name a" in ln]
    assert named == [
        f"{GUIDE}: warning: {field}: {path} seems to name a Qwen3 30B model, but the model is qwen3-235b-a22b "
        "(kept from another model.preset?)"
        for field, path in (("model.hf_weights", "./model_from_hf/Qwen3-30B-A3B"),
                            ("model.tokenizer", "./tok/Qwen3-30B-A3B"),
                            ("checkpoint.mindspeed_load", "./model_weights/Qwen3-30B-TP2-PP8-EP1"))]


def test_paths_that_fit_or_that_dpoc_derived_do_not_warn():
    assert not [w for w in plan_recipe(GUIDE).warnings if "kept from" in w]  # the guide's own layout and model
    derived = plan_recipe(GUIDE, ["parallelism=auto", "~checkpoint.mindspeed_load"])
    assert not [w for w in derived.warnings if "kept from" in w]
    llama = plan_recipe(RECIPES / "qwen3_30b_a2.yaml", ["model.preset=llama3-8b", "dataset.template=llama3",
                                                        "model.hf_weights=./hf/Meta-Llama-3.1-8B-Instruct",
                                                        "checkpoint.mindspeed_load=./w/llama3-8b-tp2-pp8-ep1"])
    assert not [w for w in llama.warnings if "kept from" in w]  # Llama-3.1 weights for the llama3 preset
