"""`dpoc diff A B`: recipes and build directories compared by resolved values (with sources) and files."""

from __future__ import annotations

import json

import pytest

from dpoc.compiler.pipeline import build
from tests.conftest import RECIPES, run_subprocess

GUIDE, A2 = RECIPES / "qwen3_30b.yaml", RECIPES / "qwen3_30b_a2.yaml"
# the files an lr change changes beyond the plan hash in their header
CHANGED = ["megatron.args", "mindspeed-rl/dpo_qwen3_30b.yaml", "mindspeed-rl/dpo_qwen3_30b_resume.yaml", "plan.json",
           "resume/megatron.args"]
# the scripts whose only change is the plan hash (headers, launch tokens)
HASHED = ["convert/mcore_to_hf.sh", "launch.sh", "nodes/node-0.sh", "nodes/node-1.sh", "preprocess.sh",
          "ray-head.sh", "ray-worker.sh"]
MINDSPEED_SCRIPTS = ["mindspeed-rl/convert/hf_to_mcore.sh", "mindspeed-rl/convert/mcore_to_hf.sh",
                   "mindspeed-rl/nodes/node-0.sh", "mindspeed-rl/nodes/node-1.sh"]


@pytest.fixture(scope="module")
def guide_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("diff") / "qwen3_30b"  # the name its recipe's default build has
    build(GUIDE, out=out)
    return out


def test_a_build_and_its_recipe_are_equal(dpoc_cli, guide_build):
    result = dpoc_cli("diff", guide_build, GUIDE)
    assert result.code == 0, result.err
    assert result.out == f"a: {guide_build}\nb: {GUIDE}\nno differences\n"


def test_an_override_shows_the_value_with_both_sources_and_the_files(dpoc_cli, guide_build):
    result = dpoc_cli("diff", guide_build, GUIDE, "training.lr=1e-7", "--json")
    assert result.code == 1, result.err
    diff = json.loads(result.out)
    assert diff["values"] == [{"path": "training.lr", "old": 5e-08, "new": 1e-07, "old_source": "user",
                               "new_source": "user:command line"}]
    assert diff["sources"] == [] and diff["equal"] is False
    assert diff["files"] == {"changed": CHANGED, "only_in_a": [], "only_in_b": [],
                             "plan_hash_only": sorted([*HASHED, *MINDSPEED_SCRIPTS])}
    text = dpoc_cli("diff", guide_build, GUIDE, "training.lr=1e-7")
    assert text.code == 1
    assert "values (1 differ):\n  training.lr: 5e-08 (user) → 1e-07 (user:command line)\n" in text.out
    assert text.out.endswith("".join(f"  changed   {p}\n" for p in CHANGED) + "(11 more files differ only in the "
                             "plan hash of their header)\n(--files shows the changed lines)\n")


def test_files_shows_the_changed_lines_of_each_file(dpoc_cli, guide_build):
    result = dpoc_cli("diff", guide_build, GUIDE, "training.lr=1e-7", "--files")
    assert result.code == 1, result.err
    shown = result.out.split("(11 more files differ only in the plan hash of their header)\n")[1]
    hunk = ["--- a/megatron.args", "+++ b/megatron.args"]
    assert shown.startswith("--- a/megatron.args\n+++ b/megatron.args\n@@ ")
    args = shown.split("--- a/mindspeed-rl/")[0].splitlines()
    assert args[:2] == hunk and [line for line in args[3:] if line[0] in "+-"] == ["---lr 5e-08", "+--lr 1e-07"]
    assert [line for line in shown.splitlines() if line.startswith(("--- ", "+++ "))] == [
        f"{sign} {side}/{p}" for p in CHANGED for sign, side in (("---", "a"), ("+++", "b"))]


def test_two_recipes_show_a_default_that_a_recipe_pins_and_files_only_one_build_has(dpoc_cli):
    """The A2 recipe leaves min_lr to its default where the guide sets 0.0; a dpo.beta MindSpeed-RL cannot
    express leaves the mindspeed-rl/ folder out of B's build."""
    result = dpoc_cli("diff", GUIDE, GUIDE, "dpo.beta=0.2", "--a-set", "~training.min_lr", "--json")
    assert result.code == 1, result.err
    diff = json.loads(result.out)
    assert [r["path"] for r in diff["values"]] == ["dpo.beta"]
    assert diff["sources"] == [{"path": "training.min_lr", "old": 0.0, "new": 0.0, "old_source": "default",
                                "new_source": "user"}]
    assert diff["files"]["only_in_a"] == sorted(["mindspeed-rl/dpo_qwen3_30b.yaml",
                                                 "mindspeed-rl/dpo_qwen3_30b_resume.yaml",
                                                 "mindspeed-rl/datasets/qwen3_30b.yaml",
                                                 "mindspeed-rl/model/qwen3_30b_a3b.yaml", *MINDSPEED_SCRIPTS])
    assert diff["files"]["only_in_b"] == []


def test_two_build_directories_and_a_value_only_one_side_has(dpoc_cli, guide_build, tmp_path):
    dense = tmp_path / "dense"
    build(GUIDE, ["model.preset=qwen3-32b", "~parallelism"], out=dense)
    result = dpoc_cli("diff", guide_build, dense, "--json")
    assert result.code == 1, result.err
    rows = {r["path"]: r for r in json.loads(result.out)["values"]}
    assert rows["model.moe.num_experts"] == {"path": "model.moe.num_experts", "old": 128, "new": "(absent)",
                                             "old_source": "preset:qwen3-30b-a3b", "new_source": "(absent)"}
    assert rows["model.moe"]["old"] == "(absent)" and rows["model.moe"]["new"] is None
    assert rows["model.num_layers"]["new"] == 64 and rows["model.num_layers"]["new_source"] == "preset:qwen3-32b"


def test_diff_errors_name_the_argument(dpoc_cli, guide_build, tmp_path):
    overridden = dpoc_cli("diff", GUIDE, guide_build, "training.lr=1e-7")
    assert overridden.code == 2
    assert overridden.err == (f"{guide_build}: (command line): overrides apply to recipes, and {guide_build} is a "
                              "build directory; valid: a recipe file, or no overrides (training.lr=1e-7)\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = dpoc_cli("diff", empty, GUIDE)
    assert missing.code == 2 and missing.err == (
        f"{empty}/plan.json: (file): cannot read it (No such file or directory); valid: a build directory written "
        "by dpoc build, or a recipe file\n")


def test_diff_exit_codes_from_a_real_process():
    same = run_subprocess("diff", GUIDE, GUIDE)
    assert same.returncode == 0 and same.stdout.endswith("no differences\n")
    other = run_subprocess("diff", GUIDE, A2)
    assert other.returncode == 1
    assert "  hardware.name: \"atlas-a3\" (derived:hardware.preset) → \"atlas-a2\" (derived:hardware.preset)\n" \
        in other.stdout
