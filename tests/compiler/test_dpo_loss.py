"""The loss family through the compiler: one list (dpoc.contract.losses) behind the schema, the resolver and
megatron.args; the parameters reach megatron.args only where a chosen loss reads them; a reference-free loss
plans, renders and estimates without a reference. Bad combinations: tests/compiler/test_malformed.py."""

from __future__ import annotations

import argparse

import pytest

from dpoc.compiler.pipeline import build, plan_recipe
from dpoc.contract import losses, megatron_args
from dpoc.contract.schemas import schema
from dpoc.runtime.step.dpo import Objective
from tests.conftest import RECIPES

GUIDE, TINY = RECIPES / "qwen3_30b.yaml", RECIPES / "tiny_cpu.yaml"


def test_schema_and_megatron_args_take_the_contract_list():
    assert tuple(schema("recipe")["$defs"]["loss_name"]["enum"]) == losses.NAMES
    flag = megatron_args.build_parser()._option_string_actions["--dpo-loss-type"]
    assert flag.type(",".join(losses.PAIRED)) == losses.PAIRED
    assert flag.type("kto") == ("kto",)
    valid = ", ".join(losses.TRAINED)
    with pytest.raises(argparse.ArgumentTypeError, match=r"^'sigmoid,kto': kto trains on unpaired completions and "
                       r"cannot be added to other losses \(valid: kto alone\)$"):
        flag.type("sigmoid,kto")
    with pytest.raises(argparse.ArgumentTypeError, match=rf"^unknown loss 'dpo' \(valid: {valid}\)$"):
        flag.type("dpo")


def _args(tmp_path, overrides):
    out = tmp_path / "b"
    build(TINY, overrides, out=out)
    text = (out / "megatron.args").read_text()
    return megatron_args.parse([f"@{out / 'megatron.args'}"]), text


def test_a_weighted_list_and_its_parameters_reach_the_runtime(tmp_path):
    args, text = _args(tmp_path, ["dpo.loss=[sigmoid,discopop,sft]", "dpo.loss_weights=[0.8,0.2,1.0]",
                                  "dpo.discopop_tau=0.1", "dpo.ld_alpha=0.4", "dpo.f_divergence_type=js_divergence"])
    objective = Objective.from_args(args)
    assert objective.terms == (("sigmoid", 0.8), ("discopop", 0.2), ("sft", 1.0))
    assert (objective.params.discopop_tau, objective.ld_alpha, objective.params.f_divergence) == (
        0.1, 0.4, "js_divergence")
    assert "--dpoc-simpo-gamma" not in text and "--dpoc-cpo-alpha" not in text and "--dpoc-f-alpha" not in text


def test_the_default_loss_renders_no_new_flags(tmp_path):
    _, text = _args(tmp_path, [])
    assert "--dpo-loss-type sigmoid\n" in text
    assert not [line for line in text.splitlines() if line.split(" ")[0] in {
        "--dpoc-loss-weights", "--dpoc-ld-alpha", "--dpoc-f-divergence", "--dpoc-discopop-tau",
        "--dpoc-simpo-gamma", "--dpoc-cpo-alpha"}]


def test_a_reference_free_loss_has_no_reference_anywhere(tmp_path):
    args, text = _args(tmp_path, ["dpo.loss=simpo", "dpo.simpo_gamma=1.2"])
    assert args.dpoc_reference == "none" and args.ref_model is None and "--ref-model" not in text
    assert (args.dpoc_simpo_gamma, args.dpoc_cpo_alpha) == (1.2, 0.0)  # TRL's SimPO: no NLL unless asked
    plan = plan_recipe(TINY, ["dpo.loss=orpo"])
    assert plan.dpo.reference == "none" and plan.checkpoint.ref_model is None
    assert plan.source_of("dpo.reference").source == "derived:dpo.loss"
    assert plan_recipe(TINY, ["dpo.loss=cpo"]).dpo.cpo_alpha == 1.0  # CPOConfig's default


def test_the_planner_drops_the_reference_of_a_reference_free_loss():
    """At the same layout: no reference weights, no reference forward, and what precomputed log-probs cost."""
    live = plan_recipe(GUIDE).estimate
    free = plan_recipe(GUIDE, ["dpo.loss=simpo"]).estimate
    precomputed = plan_recipe(GUIDE, ["dpo.reference=precomputed"]).estimate
    (live0, free0) = (e["memory"]["stages"][0] for e in (live, free))
    assert live0["reference_gib"] > 3 and free0["reference_gib"] == 0
    assert free["memory"]["peak_gib"] < live["memory"]["peak_gib"] - live0["reference_gib"] + 1e-9
    assert free["throughput"]["samples_per_s"] > 1.2 * live["throughput"]["samples_per_s"]
    assert free["throughput"] == precomputed["throughput"] and "reference_pass" not in free
    assert free["reference"] == "none"
