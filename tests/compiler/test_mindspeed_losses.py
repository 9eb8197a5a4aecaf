"""The loss family on the MindSpeed-RL target: sigmoid, hinge and ipo render as MindSpeed-LLM's `dpo_loss_type`;
beta, label smoothing and the SFT weight (MindSpeed-LLM's --dpo-beta, --dpo-label-smoothing, --pref-ftx) have no
MegatronConfig field to render them under, so any value but MindSpeed-LLM's default is refused with that reason
(exit 2, runtime=dpoc the valid choice), as is every other loss."""

from __future__ import annotations

import pytest

from dpoc.compiler.pipeline import plan_recipe
from dpoc.compiler.render.targets import mindspeed_rl
from dpoc.contract import losses
from tests.compiler.test_build import MINDSPEED_FIELDS
from tests.conftest import RECIPES

MOE = RECIPES / "qwen3_30b.yaml"
THEIRS = ("sigmoid", "hinge", "ipo")


@pytest.fixture
def refusal(dpoc_cli, tmp_path):
    """`dpoc build` of the guide recipe on the MindSpeed-RL target with `overrides`: it exits 2, writes nothing,
    and its stderr lines are returned."""
    def run(overrides) -> list[str]:
        result = dpoc_cli("build", MOE, "runtime=mindspeed-rl", *overrides, "-o", tmp_path / "build")
        assert result.code == 2 and not (tmp_path / "build").exists(), result.out
        return result.err.strip().splitlines()

    return run


def _refused(field: str, value: str, name: str, default: str) -> str:
    return (f"{MOE}: {field}: {value}: MindSpeed-RL's DPO config (MegatronConfig) has no {name} field "
            f"(MindSpeed-LLM's --{name.replace('_', '-')}), so MindSpeed-LLM's default {default} applies; valid: "
            f"{default}, or runtime=dpoc")


def test_the_mindspeed_losses_are_the_three_mindspeed_llm_has():
    assert tuple(loss.name for loss in losses.LOSSES if loss.mindspeed) == THEIRS


@pytest.mark.parametrize("loss", THEIRS)
def test_each_mindspeed_loss_renders_as_its_dpo_loss_type(loss):
    train = mindspeed_rl.training_config(plan_recipe(MOE, ["runtime=mindspeed-rl", f"dpo.loss={loss}"]), resume=False)
    assert train["dpo_loss_type"] == loss
    assert set(train) - {"model"} <= MINDSPEED_FIELDS


def test_beta_smoothing_and_the_sft_weight_have_no_megatron_config_field():
    """The fact the refusals rest on: MindSpeed-RL's MegatronConfig (tests/fixtures, from its source) lacks the
    three; should a MindSpeed-RL release add one, this fails and the target should render it instead."""
    names = [name for _, name, _ in mindspeed_rl.MINDSPEED_LLM_ONLY]
    assert names == ["dpo_beta", "dpo_label_smoothing", "pref_ftx"]
    assert MINDSPEED_FIELDS.isdisjoint(names) and "dpo_loss_type" in MINDSPEED_FIELDS


def test_sigmoid_with_beta_smoothing_and_an_sft_weight_is_refused_with_the_reason(refusal):
    assert refusal(["dpo.beta=0.2", "dpo.label_smoothing=0.1", "dpo.sft_weight=0.5"]) == [
        _refused("dpo.beta", "0.2", "dpo_beta", "0.1"),
        _refused("dpo.label_smoothing", "0.1", "dpo_label_smoothing", "0"),
        _refused("dpo.sft_weight", "0.5", "pref_ftx", "0")]


@pytest.mark.parametrize("loss", ["hinge", "ipo"])
def test_hinge_and_ipo_with_an_sft_weight_are_refused_with_the_reason(refusal, loss):
    assert refusal([f"dpo.loss={loss}", "dpo.sft_weight=0.25"]) == [
        _refused("dpo.sft_weight", "0.25", "pref_ftx", "0")]


@pytest.mark.parametrize("loss", ["simpo", "orpo", "kto", "[sigmoid,sft]"])
def test_every_other_loss_is_refused_with_the_reason(refusal, loss):
    shown = ", ".join(loss.strip("[]").split(","))
    assert refusal([f"dpo.loss={loss}"]) == [
        f"{MOE}: dpo.loss: {shown}: MindSpeed-LLM's DPO has one loss of sigmoid, hinge, ipo; valid: one of those, "
        "or runtime=dpoc"]
