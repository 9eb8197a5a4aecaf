"""The DPO objective, as the runtime computes it (megatron-core's vocab-parallel cross entropy on float32
logits, then `Objective`), against an independent float64 implementation of the formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from dpoc.runtime.losses import Params
from dpoc.runtime.step.dpo import REWARD_KEYS, Objective, summed_logps

PAIRS, LENGTH, VOCAB = 3, 12, 50


@pytest.fixture(scope="module", autouse=True)
def one_process_group():
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    policy = torch.randn(2 * PAIRS, LENGTH, VOCAB, generator=g) * 3
    reference = torch.randn(2 * PAIRS, LENGTH, VOCAB, generator=g) * 3
    targets = torch.randint(0, VOCAB, (2 * PAIRS, LENGTH), generator=g)
    mask = torch.zeros(2 * PAIRS, LENGTH)
    for row in range(2 * PAIRS):  # a prompt, a response, then padding
        start = int(torch.randint(1, 5, (1,), generator=g))
        end = int(torch.randint(start + 1, LENGTH + 1, (1,), generator=g))
        mask[row, start:end] = 1
    return policy, reference, targets, mask


def _runtime(objective: Objective, policy, reference, targets, mask):
    def token_nll(logits):  # megatron-core's layout: [s, b, v] in, [s, b] out
        return vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(), targets.t().contiguous()).t()

    reference_logps = summed_logps(-token_nll(reference), mask)  # the loss normalizes them (IPO: per token)
    return objective.loss_from_tokens(token_nll(policy), mask, reference_logps, mean_pairs=PAIRS)


def _float64(loss_type, beta, smoothing, sft, policy, reference, targets, mask):
    """The formulas, written out pair by pair in float64 (IPO's log-ratios per response token; the rewards
    from the summed log-ratios for every loss, as TRL logs them)."""
    def seq_logps(logits):
        logp = torch.log_softmax(logits.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        rows = []
        for r in range(logp.shape[0]):
            rows.append(sum(float(logp[r, t]) for t in range(LENGTH) if mask[r, t]))
        return rows, logp

    lengths = [float(mask[r].sum()) for r in range(2 * PAIRS)]

    pi, pi_tokens = seq_logps(policy)
    ref, _ = seq_logps(reference)
    chosen_tokens = [(i, t) for i in range(PAIRS) for t in range(LENGTH) if mask[i, t]]
    chosen_nll = -sum(float(pi_tokens[i, t]) for i, t in chosen_tokens) / len(chosen_tokens)  # over the batch
    losses, chosen_r, rejected_r = [], [], []
    for i in range(PAIRS):
        z = (pi[i] - pi[PAIRS + i]) - (ref[i] - ref[PAIRS + i])
        if loss_type == "ipo":
            z = (pi[i] - ref[i]) / lengths[i] - (pi[PAIRS + i] - ref[PAIRS + i]) / lengths[PAIRS + i]
        if loss_type == "sigmoid":
            value = (-math.log(1 / (1 + math.exp(-beta * z))) * (1 - smoothing)
                     - math.log(1 / (1 + math.exp(beta * z))) * smoothing)
        elif loss_type == "hinge":
            value = max(0.0, 1 - beta * z)
        else:
            value = (z - 1 / (2 * beta)) ** 2
        value += sft * chosen_nll
        losses.append(value)
        chosen_r.append(beta * (pi[i] - ref[i]))
        rejected_r.append(beta * (pi[PAIRS + i] - ref[PAIRS + i]))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "loss": mean(losses),
        "rewards/chosen": mean(chosen_r),
        "rewards/rejected": mean(rejected_r),
        "rewards/accuracies": mean([float(c > r) for c, r in zip(chosen_r, rejected_r, strict=True)]),
        "rewards/margins": mean([c - r for c, r in zip(chosen_r, rejected_r, strict=True)]),
        "logps/chosen": mean(pi[:PAIRS]),
        "logps/rejected": mean(pi[PAIRS:]),
    }


@pytest.mark.parametrize(("loss_type", "beta", "smoothing", "sft"), [
    ("sigmoid", 0.1, 0.0, 0.0),
    ("sigmoid", 0.5, 0.2, 0.0),
    ("sigmoid", 0.1, 0.0, 0.3),
    ("hinge", 0.3, 0.0, 0.0),
    ("ipo", 0.2, 0.0, 0.0),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_metrics_match_float64_formulas(loss_type, beta, smoothing, sft, seed):
    batch = _batch(seed)
    loss, metrics = _runtime(Objective((loss_type,), Params(beta, smoothing), sft_weight=sft), *batch)
    expected = _float64(loss_type, beta, smoothing, sft, *batch)
    assert float(loss) == pytest.approx(expected["loss"], rel=1e-5, abs=1e-6)
    for key in REWARD_KEYS:  # sums over the micro-batch's pairs
        assert float(metrics[key]) / PAIRS == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key


def test_gradient_flows_to_the_policy_only():
    policy, reference, targets, mask = _batch(3)
    policy.requires_grad_(True)
    reference.requires_grad_(True)
    loss, _ = _runtime(Objective(), policy, reference, targets, mask)
    loss.backward()
    assert policy.grad.abs().sum() > 0
    assert reference.grad is None
