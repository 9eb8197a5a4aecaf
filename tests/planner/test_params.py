"""Parameter counts: the planner's one count, against the toy counted by hand and against the tensors the
runtime's weight map says every preset's Hugging Face checkpoint holds."""

from __future__ import annotations

import math

import pytest

from dpoc.contract import resources
from dpoc.contract.architecture import MoESpec
from dpoc.contract.specs import preset_model
from dpoc.planner.layout import make_layout
from dpoc.planner.params import matmul_params, stage_shard
from dpoc.runtime.weights.weight_map import hf_tensors


def whole_model(specs, model) -> int:
    """Every parameter, as the one rank of a single-device layout holds them."""
    layout = make_layout(model, specs.hardware(devices_per_node=1), 8, {"micro_batch_size": 1})
    return stage_shard(model, layout, 0, model.num_layers).total


def test_toy_parameter_count(specs):
    # 2 layers * (192 + 384 + 16) + embedding 256 + untied head 256 + final norm 8
    assert whole_model(specs, specs.model()) == 2 * 592 + 256 + 256 + 8 == 1704
    # tied: one 256 table
    assert whole_model(specs, specs.model(tie_embeddings=True)) == 1448


def test_matmul_params_count_the_active_weights(specs):
    # dense: 2 layers * (attention projections 192 + MLP 384) + LM head 256
    assert matmul_params(specs.model()) == 2 * (192 + 384) + 256 == 1408
    # 4 experts of FFN 4, 2 active: 2 * 3 * 8 * 4 = 192 per layer instead of the dense MLP
    moe = MoESpec(num_experts=4, topk=2, ffn_hidden_size=4, aux_loss_coeff=0.0, norm_topk_prob=True)
    assert matmul_params(specs.model(family="qwen3_moe", moe=moe)) == 2 * (192 + 192) + 256 == 1024


@pytest.mark.parametrize("name", resources.preset_names("models"))
def test_planner_counts_the_tensors_the_weight_map_loads(specs, name):
    model = preset_model(name)
    held = sum(math.prod(shape) for shape in hf_tensors(model).values())
    assert whole_model(specs, model) == held
