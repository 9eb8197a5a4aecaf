"""Each rule, on a layout that passes it and on one that breaks it, with the exact field and numbers named."""

from __future__ import annotations

import dataclasses

import pytest

from dpoc.compiler.pipeline import plan_recipe
from dpoc.compiler.resolve import rules
from dpoc.planner.layout import make_layout
from tests.conftest import RECIPES

BASE = plan_recipe(RECIPES / "qwen3_30b.yaml")  # Qwen3-30B-A3B, 2×16 A3 dies, tp2 pp8 ep1


def context(knobs=None, model=None, hardware=None, training=None, dpo=None, gbs=None):
    plan = BASE
    m = dataclasses.replace(plan.model, **(model or {}))
    hw = dataclasses.replace(plan.hardware, **(hardware or {}))
    base_knobs = {"tp": 2, "pp": 8, "ep": 1}
    lay = make_layout(m, hw, gbs or plan.layout.global_batch_size, {**base_knobs, **(knobs or {})})
    return rules.Context(m, hw, lay, dataclasses.replace(plan.training, **(training or {})),
                         dataclasses.replace(plan.dpo, **(dpo or {})))


DENSE_MODEL = {"moe": None, "name": "qwen3-8b"}

CASES = [
    # rule, passing context kwargs, failing context kwargs, field, text in the message
    (rules.dense_grid, {}, {"knobs": {"pp": 3, "num_layer_list": [16, 16, 16]}}, "parallelism.pp",
     "tp·pp·cp = 2·3·1 = 6 does not divide the world size 32 (2 nodes × 16 devices); valid: pp in "
     "{1, 2, 4, 8, 16} at tp=2, cp=1"),
    (rules.expert_grid, {}, {"knobs": {"ep": 3, "etp": 2}}, "parallelism.ep",
     "expert grid etp·ep·pp = 2·3·8 = 48 does not divide the world size 32; valid: ep in {1, 2} at etp=2, pp=8"),
    (rules.heads_divisible_by_tp, {}, {"knobs": {"tp": 8}}, "parallelism.tp",
     "tp=8: 32 attention heads and 4 KV heads need tp in {1, 2, 4}"),
    (rules.vocab_divisible_by_tp, {}, {"model": {"vocab_size": 151669}}, "parallelism.tp",
     "tp=2: the 151669 vocabulary rows do not split evenly; valid: tp in {1, 7}, or weights whose vocab_size is a "
     "multiple of tp"),
    (rules.tp_within_node, {}, {"knobs": {"tp": 32}}, "parallelism.tp",
     "tp=32 would put a tensor-parallel group across nodes over the slow inter-node link (16 devices per node)"),
    (rules.layers_divisible_by_pp, {}, {"knobs": {"pp": 5}}, "parallelism.pp",
     "pp=5 does not divide 48 layers; valid: pp in {1, 2, 3, 4, 6, 8, 12, 16, 24, 48}"),
    (rules.layer_list_matches, {"knobs": {"pp": 4, "num_layer_list": [12, 13, 12, 11]}},
     {"knobs": {"pp": 4, "num_layer_list": [12, 13, 12, 12]}}, "parallelism.num_layer_list",
     "sums to 49 but the model has 48 layers"),
    (rules.noop_layers_in_range, {"knobs": {"noop_layers": [48, 49]}}, {"knobs": {"noop_layers": [50]}},
     "parallelism.noop_layers", "indices [50] are outside the 49 layers (48 real + 1 no-op); valid: 0..48"),
    (rules.virtual_pipeline, {"knobs": {"vpp": 2}}, {"knobs": {"vpp": 4}}, "parallelism.vpp",
     "vpp=4 does not divide the 6 layers per pipeline stage; valid: vpp in {1, 2, 3, 6}"),
    (rules.global_batch_divisible, {}, {"gbs": 63}, "training.global_batch_size",
     "63 pairs is not a multiple of micro_batch_size·dp = 1·2 = 2; valid: e.g. {62, 64}"),
    (rules.sequence_fits_model, {}, {"training": {"seq_length": 50000}}, "training.seq_length",
     "50000 exceeds the model's max_position_embeddings 40960; valid: seq_length <= 40960"),
    (rules.context_parallel, {"knobs": {"cp": 2, "pp": 4}}, {"knobs": {"cp": 2, "pp": 4}, "training": {"seq_length": 4097}},
     "parallelism.cp", "cp=2: seq_length 4097 must be divisible by 2·cp = 4"),
    (rules.sequence_parallel_needs_tp, {}, {"knobs": {"tp": 1, "sequence_parallel": True}},
     "parallelism.sequence_parallel", "sequence parallelism needs tp > 1 (tp=1); valid: false"),
    (rules.static_padding_divisible, {"training": {"dynamic_padding": False}},
     {"training": {"dynamic_padding": False, "seq_length": 4095}}, "training.seq_length",
     "4095 must be divisible by tp·cp = 2 when sequences are padded to seq_length"),
    (rules.expert_knobs_need_moe, {"model": DENSE_MODEL}, {"model": DENSE_MODEL, "knobs": {"ep": 2}},
     "parallelism.ep", "qwen3-8b is a dense model (no experts); remove it"),
    (rules.experts_divisible_by_ep, {"knobs": {"ep": 2}}, {"knobs": {"ep": 3}}, "parallelism.ep",
     "ep=3 does not divide 128 experts; valid: ep in {1, 2, 4, 8, 16, 32, 64, 128}"),
    (rules.expert_tensor_parallel, {"knobs": {"etp": 1}}, {"knobs": {"tp": 4, "etp": 2}}, "parallelism.etp",
     "etp=2: experts are split either like attention or not at all"),
    (rules.moe_needs_sequence_parallel, {}, {"knobs": {"sequence_parallel": False}}, "parallelism.sequence_parallel",
     "a MoE model with tp=2 needs sequence parallelism (Megatron refuses it otherwise); valid: true"),
    (rules.tp_extend_ep, {"knobs": {"moe_tp_extend_ep": True}},
     {"knobs": {"moe_tp_extend_ep": True, "moe_dispatcher": "allgather"}}, "parallelism.moe_tp_extend_ep",
     "is incompatible with the allgather dispatcher"),
    (rules.alltoall_overlap,
     {"knobs": {"moe_alltoall_overlap_comm": True, "moe_permutation_async_comm": True,
                "moe_dispatcher": "alltoall_seq", "moe_tp_extend_ep": True}},
     {"knobs": {"moe_alltoall_overlap_comm": True}}, "parallelism.moe_alltoall_overlap_comm",
     "needs moe_permutation_async_comm=true, moe_dispatcher=alltoall_seq, moe_tp_extend_ep=true"),
    (rules.grouped_gemm_device, {}, {"knobs": {"moe_grouped_gemm": True}, "hardware": {"device": "cpu", "name": "cpu"}}, "parallelism.moe_grouped_gemm",
     "grouped GEMM kernels exist only on npu and cuda devices (hardware cpu is cpu); valid: false"),
    (rules.expert_group_placement, {"knobs": {"ep": 32, "pp": 1}, "hardware": {"superpod_nodes": 48}},
     {"knobs": {"ep": 32, "pp": 1}, "hardware": {"superpod_nodes": 1}}, "parallelism.ep",
     "the expert-parallel group (ep·etp = 64 devices) spans nodes over the"),
    (rules.recompute_options, {"knobs": {"recompute": "full", "recompute_num_layers": 6}},
     {"knobs": {"recompute": "full", "recompute_num_layers": 7}}, "parallelism.recompute_num_layers",
     "7 exceeds the 6 layers of the smallest pipeline chunk; valid: 1..6"),
    (rules.learning_rate_schedule, {}, {"training": {"min_lr": 1e-3}}, "training.min_lr",
     "0.001 exceeds lr 5e-08; valid: min_lr <= lr"),
]


@pytest.mark.parametrize("rule, passing, failing, field, text", CASES, ids=[c[0].__name__ for c in CASES])
def test_rule_passes_and_fails(rule, passing, failing, field, text):
    assert list(rule(context(**passing))) == []
    violations = list(rule(context(**failing)))
    assert violations, f"{rule.__name__} accepted {failing}"
    assert violations[0].field == field
    assert text in violations[0].message


def test_every_rule_is_tested():
    assert {c[0] for c in CASES} | {rules.pipeline_has_enough_microbatches} == set(rules.RULES)


def test_few_microbatches_is_a_warning_not_an_error():
    assert list(rules.pipeline_has_enough_microbatches(context())) == []
    (v,) = rules.pipeline_has_enough_microbatches(context(gbs=8))  # 4 micro-batches for 8 stages
    assert v.warning and v.field == "training.global_batch_size"
    assert v.message == "4 micro-batches per step cannot fill 8 pipeline stages (bubble over 63%)"


def test_ep_across_nodes_on_a2_is_flagged_as_a_warning():
    (v,) = rules.expert_group_placement(context(knobs={"ep": 32, "pp": 1}, hardware={"superpod_nodes": 0}))
    assert v.warning and "spans nodes over the 25 GB/s inter-node link" in v.message


def test_a_follow_on_violation_is_left_out_while_its_root_cause_stands():
    """tp=3 makes the pinned etp=2 invalid too ("valid: etp in {1, 3}"): only tp, the root cause, is reported."""
    alone = list(rules.expert_tensor_parallel(context(knobs={"tp": 3, "etp": 2})))
    assert [v.field for v in alone] == ["parallelism.etp"]
    fields = {v.field for v in rules.check(context(knobs={"tp": 3, "etp": 2}))}
    assert "parallelism.tp" in fields and "parallelism.etp" not in fields
    assert [v.field for v in rules.check(context(knobs={"tp": 2, "etp": 4}))] == ["parallelism.etp"]


def test_shipped_guide_layouts_pass_every_rule():
    assert rules.check(context()) == []


def test_ulysses_needs_heads_divisible_by_cp_tp_and_ring_does_not():
    """MindSpeed's UlyssesContextParallelFeature splits heads over cp·tp; ring attention splits the sequence."""
    heads = {"num_attention_heads": 24, "num_query_groups": 4}  # 24 % (4 * 2) = 0, 24 % (8 * 2) != 0
    knobs = {"cp": 8, "pp": 1, "cp_algo": "ulysses"}
    (v,) = rules.context_parallel(context(knobs=knobs, model=heads))
    assert (v.field, v.message) == ("parallelism.cp", "cp=8: Ulysses context parallelism needs the 24 heads divisible "
                                    "by cp·tp = 16; valid: cp in {2, 3, 4, 6, 12}, or cp_algo=ring")
    assert list(rules.context_parallel(context(knobs={**knobs, "cp": 4}, model=heads))) == []
    assert list(rules.context_parallel(context(knobs={**knobs, "cp_algo": "ring"}, model=heads))) == []
