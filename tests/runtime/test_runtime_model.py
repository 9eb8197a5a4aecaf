"""Model configuration from megatron.args: what reaches megatron-core, and what is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn.functional as F
from megatron.core.transformer.enums import LayerType

from dpoc.contract import megatron_args
from dpoc.contract.errors import DpocError
from dpoc.runtime.model.device import Device
from dpoc.runtime.model.gpt import check_supported, transformer_config
from tests.runtime.synthetic import write_args, write_pairs

ROOT = Path(__file__).resolve().parents[2]

CPU = Device("cpu", "gloo")


def parse(tmp_path: Path, **kwargs):
    path = write_args(tmp_path / "m.args", "data/pairs", tmp_path / "run", **kwargs)
    return megatron_args.parse([f"@{path}"])


def test_qwen3_moe_architecture_reaches_megatron(tmp_path):
    config = transformer_config(parse(tmp_path, moe=True, extra=[("--moe-grouped-gemm", True)]), CPU)
    assert (config.num_query_groups, config.kv_channels, config.normalization) == (2, 16, "RMSNorm")
    assert config.gated_linear_unit and config.activation_func is F.silu and not config.add_bias_linear
    assert config.qk_layernorm and config.layernorm_epsilon == 1e-6
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (4, 2, 32)
    assert not config.moe_router_pre_softmax  # softmax over the top-k logits = normalised top-k probs
    assert config.moe_aux_loss_coeff == 0.001
    assert not config.moe_grouped_gemm  # never megatron's GroupedMLP (grouped_gemm package): see experts.py
    assert config.use_cpu_initialization and not config.gradient_accumulation_fusion


def test_uneven_pipeline_becomes_a_stage_layout(tmp_path):
    args = parse(tmp_path, layout=[("--pipeline-model-parallel-size", 2), ("--num-layer-list", "3,1")])
    layout = transformer_config(args, CPU).pipeline_model_parallel_layout.layout
    assert [stage[0].count(LayerType.decoder) for stage in layout] == [3, 1]
    assert layout[0][0][0] == LayerType.embedding and layout[1][0][-1] == LayerType.loss


def test_interleaved_pipeline_on_two_stages_avoids_batched_p2p(tmp_path):
    args = parse(tmp_path, layout=[("--pipeline-model-parallel-size", 2),
                                   ("--num-layers-per-virtual-pipeline-stage", 1)])
    config = transformer_config(args, CPU)
    assert config.virtual_pipeline_model_parallel_size == 2
    assert not config.batch_p2p_comm and not config.variable_seq_lengths


def test_gloo_workarounds_stay_off_hccl_and_nccl(tmp_path):
    for device, backend in (("npu", "hccl"), ("cuda", "nccl")):
        args = parse(tmp_path, layout=[("--pipeline-model-parallel-size", 2),
                                       ("--num-layers-per-virtual-pipeline-stage", 1)],
                     extra=[("--dpoc-device", device), ("--distributed-backend", backend)])
        config = transformer_config(args, Device(device, backend))
        assert config.batch_p2p_comm and config.variable_seq_lengths, backend


def test_bad_layer_list_is_refused(tmp_path):
    args = parse(tmp_path, layout=[("--pipeline-model-parallel-size", 2), ("--num-layer-list", "3,2")])
    with pytest.raises(DpocError) as err:
        check_supported(args, "m.args")
    assert str(err.value) == (
        "m.args: --num-layer-list: 3,2 must give each of the 2 pipeline stages at least one layer, "
        "4 layers in all, without a virtual pipeline (got 2 stages, 5 layers)")


def test_a_pass_micro_batch_without_the_pass_is_refused(tmp_path):
    args = parse(tmp_path, layout=[("--dpoc-reference-micro-batch-size", 4)])
    with pytest.raises(DpocError) as err:
        check_supported(args, "m.args")
    assert str(err.value) == (
        "m.args: --dpoc-reference-micro-batch-size: 4: sizes the precompute pass, which --dpoc-reference live does "
        "not run (valid: drop it, or --dpoc-reference precomputed)")


def test_a_deferred_parameter_gather_without_the_distributed_optimizer_is_refused(tmp_path):
    args = parse(tmp_path, distributed_optimizer=False, extra=[("--overlap-param-gather", True)])
    with pytest.raises(DpocError) as err:
        check_supported(args, "m.args")
    assert str(err.value) == (
        "m.args: --overlap-param-gather: defers the distributed optimizer's parameter all-gather, and this run has "
        "none (valid: add --use-distributed-optimizer, or drop it)")


def test_initial_adapters_without_lora_are_refused(tmp_path):
    args = parse(tmp_path, extra=[("--lora-load", "sft-adapter")])
    with pytest.raises(DpocError) as err:
        check_supported(args, "m.args")
    assert str(err.value) == ("m.args: --lora-load: sft-adapter: initial adapters need LoRA on (valid: --lora-r and "
                              "--lora-alpha with it, or drop it)")


def test_an_experts_kernel_the_device_lacks_is_refused(tmp_path):
    args = parse(tmp_path, moe=True, extra=[("--moe-grouped-gemm", True), ("--dpoc-moe-experts", "npu-gmm")])
    with pytest.raises(DpocError) as err:
        check_supported(args, "m.args")
    assert str(err.value) == "m.args: --dpoc-moe-experts: npu-gmm does not run on --dpoc-device cpu (valid: sequential)"


@pytest.mark.parametrize("kind, requested, runs", [("cuda", "torch-grouped-mm", "torch-grouped-mm"),
                                                   ("cuda", "sequential", "sequential"), ("npu", "npu-gmm", "npu-gmm"),
                                                   ("npu", None, "npu-gmm")])
def test_the_runtime_runs_the_plans_experts_path(tmp_path, kind, requested, runs):
    from dpoc.runtime.model.gpt import expert_path

    extra = [("--dpoc-device", kind), ("--moe-grouped-gemm", True),
             *([("--dpoc-moe-experts", requested)] if requested else [])]
    assert expert_path(parse(tmp_path, moe=True, extra=extra)) == runs


def test_moe_with_tensor_parallelism_needs_sequence_parallelism(tmp_path):
    args = parse(tmp_path, moe=True, layout=[("--tensor-model-parallel-size", 2)])
    with pytest.raises(DpocError) as err:
        check_supported(args, "m.args")
    assert str(err.value) == (
        "m.args: --sequence-parallel: megatron-core refuses MoE with tensor parallelism (tp=2) without "
        "sequence parallelism (valid: set the flag)")


@pytest.mark.slow
def test_the_lm_head_runs_on_response_positions_only_with_the_full_heads_losses_and_gradients(tmp_path):
    """`ResponseLogitsGPTModel` skips prompt and padding positions; what it returns and back-propagates
    equals the full logits' cross entropy (layouts, sequence parallelism included: test_runtime_train)."""
    args = write_args(tmp_path / "r.args", write_pairs(tmp_path / "pairs", pairs=8), tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-W", "ignore", str(Path(__file__).with_name("response_logits_probe.py")),
                          str(args)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for kind in ("padded", "packed"):
        r = result[kind]
        assert 0 < r["kept"] < r["positions"], r  # prompts and padding are really skipped
        assert r["skipped_nonzero"] == 0
        assert r["loss"] < 1e-6 and r["grad"] < 1e-5, (kind, r)
