"""Every preference loss against TRL 1.16's own code, on the same per-token log-probs in float64: the loss,
its gradient with respect to the policy's token log-probs, and the metrics TRL logs.

TRL's trainers compute their losses inside methods that also run the model; the tests call those methods
(DPOTrainer._compute_loss, CPOTrainer/ORPOTrainer.get_batch_loss_metrics) on a minimal stand-in for the
trainer whose "model" returns fixed per-token log-probs, so the formulas run are TRL's, not copies.
"""

from __future__ import annotations

import contextlib
import types
from collections import defaultdict

import pytest
import torch
import trl.experimental.cpo.cpo_trainer as trl_cpo  # the test extra has trl: a missing one fails, never skips
import trl.experimental.orpo.orpo_trainer as trl_orpo
import trl.trainer.dpo_trainer as trl_dpo

from dpoc.contract import losses
from dpoc.runtime.losses import Params
from dpoc.runtime.step.dpo import Objective

PAIRS, LENGTH = 4, 9
TOL = dict(rel=1e-6, abs=1e-9)


def _data(seed: int):
    """Per-token log-probs of policy and reference [2n, L] and a response mask (a prompt, then a response of
    varying length, then padding)."""
    g = torch.Generator().manual_seed(seed)
    policy = -torch.rand(2 * PAIRS, LENGTH, generator=g, dtype=torch.float64) * 2
    reference = policy - 0.3 * torch.randn(2 * PAIRS, LENGTH, generator=g, dtype=torch.float64)
    mask = torch.zeros(2 * PAIRS, LENGTH, dtype=torch.float64)
    for row in range(2 * PAIRS):
        start = int(torch.randint(0, 3, (1,), generator=g))
        end = int(torch.randint(start + 1, LENGTH + 1, (1,), generator=g))
        mask[row, start:end] = 1
    return policy, reference, mask


class _TokenModel(torch.nn.Module):
    """Stands in for a causal LM under TRL's fused LM head: per-token log-probs of the labelled positions."""

    is_gradient_checkpointing = False

    def __init__(self, token_logps: torch.Tensor, trainable: bool):
        super().__init__()
        self.logps = torch.nn.Parameter(token_logps.clone(), requires_grad=trainable)

    def forward(self, labels=None, **_):
        shifted = (labels[:, 1:] != -100).to(self.logps.dtype)
        zeros = torch.zeros_like(shifted)
        return types.SimpleNamespace(log_probs=self.logps * shifted, entropy=zeros, mean_logits=zeros,
                                     is_top1=shifted.bool())


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def autocast():
        return contextlib.nullcontext()


def _dpoc(objective: Objective, policy, reference, mask):
    """dpoc's loss, metrics (means over the pairs) and gradient on the policy's token log-probs."""
    token_logps = policy.clone().requires_grad_(True)
    ref = objective.sequence_logps(reference, mask) if not objective.reference_free else None
    pairs = policy.shape[0] // 2
    loss, metrics = objective.loss_from_tokens(-token_logps, mask, ref, mean_pairs=pairs)
    loss.backward()
    return float(loss.detach()), {k: float(v) / pairs for k, v in metrics.items()}, token_logps.grad


def _trl_dpo(loss_types, weights, policy, reference, mask, **settings):
    """TRL's DPOTrainer._compute_loss on these log-probs: inputs one token longer (TRL shifts the mask)."""
    model, ref_model = _TokenModel(policy, True), _TokenModel(reference, False)
    completion = torch.cat([torch.zeros(policy.shape[0], 1, dtype=torch.long), mask.long()], dim=1)
    inputs = {"input_ids": torch.ones_like(completion), "attention_mask": torch.ones_like(completion),
              "completion_mask": completion}
    trainer = types.SimpleNamespace(
        model=model, ref_model=ref_model, accelerator=_Accelerator(), aux_loss_enabled=False,
        precompute_ref_logps=False, ld_alpha=settings.get("ld_alpha"),
        f_divergence_type=settings.get("f_divergence", "reverse_kl"),
        f_alpha_divergence_coef=settings.get("f_alpha", 0.5), loss_types=list(loss_types),
        loss_weights=list(weights) if weights else [1.0] * len(loss_types), beta=settings.get("beta", 0.1),
        label_smoothing=settings.get("label_smoothing", 0.0), use_weighting=False,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None,
                                   discopop_tau=settings.get("discopop_tau", 0.05)),
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, model, inputs, False)
    loss.backward()
    return float(loss.detach()), {k: v[0] for k, v in trainer._metrics["train"].items()}, model.logps.grad


REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
PAIRED = [loss.name for loss in losses.LOSSES if loss.reference and not loss.unpaired]
F_DIVERGENCE = [loss.name for loss in losses.LOSSES if loss.f_divergence]


def _settings(name: str) -> dict:
    """A parameter value for the losses that read one (exo_pair needs epsilon > 0)."""
    return {"label_smoothing": 0.2 if name in ("exo_pair", "robust") else 0.0, "discopop_tau": 0.3}


def _compare(objective, trl_loss_types, weights, seed, dtype=torch.float64, **settings):
    policy, reference, mask = (x.to(dtype) for x in _data(seed))
    tol = TOL if dtype == torch.float64 else dict(rel=1e-5, abs=1e-6)
    loss, metrics, grad = _dpoc(objective, policy, reference, mask)
    trl_loss, trl_metrics, trl_grad = _trl_dpo(trl_loss_types, weights, policy, reference, mask, **settings)
    assert loss == pytest.approx(trl_loss, **tol)
    torch.testing.assert_close(grad, trl_grad, rtol=tol["rel"], atol=tol["abs"] / 10)
    for key in REWARDS:
        assert metrics[key] == pytest.approx(trl_metrics[key], **tol), key


def _objective(names, weights=(), sft_weight=0.0, ld_alpha=None, **settings) -> Objective:
    return Objective(tuple(names), Params(**settings), tuple(weights), sft_weight,
                     ld_alpha)


@pytest.mark.parametrize("name", PAIRED)
@pytest.mark.parametrize("seed", [0, 1])
def test_each_paired_loss_equals_trl(name, seed):
    settings = {"beta": 0.7, **_settings(name)}
    _compare(_objective([name], **settings), [name], None, seed, **settings)


@pytest.mark.parametrize("name", F_DIVERGENCE)
@pytest.mark.parametrize("divergence,alpha", [("forward_kl", 0.5), ("js_divergence", 0.5),
                                              ("alpha_divergence", 0.3)])
def test_f_divergences_equal_trl(name, divergence, alpha):
    """TRL's alpha_divergence runs in float32 only (its clamp table has no float64): compared there."""
    settings = {"beta": 0.4, "f_divergence": divergence, "f_alpha": alpha, **_settings(name)}
    dtype = torch.float32 if divergence == "alpha_divergence" else torch.float64
    _compare(_objective([name], **settings), [name], None, 3, dtype, **settings)


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "bco_pair", "aot"])
def test_ld_alpha_equals_trl(name):
    _compare(_objective([name], ld_alpha=0.35, beta=0.5), [name], None, 4, ld_alpha=0.35, beta=0.5)


def test_weighted_list_equals_trl_mpo():
    """MPO: sigmoid + bco_pair + sft with weights, TRL's documented combination."""
    weights = (0.8, 0.2, 1.0)
    _compare(_objective(["sigmoid", "bco_pair", "sft"], weights, beta=0.3), ["sigmoid", "bco_pair", "sft"],
             weights, 5, beta=0.3)


def test_sft_weight_is_rpo():
    """`dpo.sft_weight` w equals TRL's loss_type [sigmoid, sft] with weights [1, w]."""
    _compare(_objective(["sigmoid"], sft_weight=0.6, beta=0.2), ["sigmoid", "sft"], [1.0, 0.6], 6, beta=0.2)


def test_sigmoid_label_smoothing_is_cdpo():
    """TRL 1.16's sigmoid ignores label_smoothing; dpoc's sigmoid keeps MindSpeed-LLM's cDPO smoothing, which
    is TRL's aot_unpaired on a batch of one pair (sorting one value changes nothing)."""
    policy, reference, mask = _data(7)
    for pair in range(PAIRS):
        rows = torch.tensor([pair, PAIRS + pair])
        one = (policy[rows], reference[rows], mask[rows])
        loss, _, grad = _dpoc(_objective(["sigmoid"], beta=0.5, label_smoothing=0.15), *one)
        trl_loss, _, trl_grad = _trl_dpo(["aot_unpaired"], None, *one, beta=0.5, label_smoothing=0.15)
        assert loss == pytest.approx(trl_loss, **TOL)
        torch.testing.assert_close(grad, trl_grad, rtol=1e-6, atol=1e-10)


# --- reference-free: CPOTrainer and ORPOTrainer ---------------------------------------------------------


def _sequence_stats(token_logps, mask, averaged: bool):
    sums = (token_logps * mask).sum(-1)
    logps = sums / mask.sum(-1) if averaged else sums
    nll = -(token_logps[:PAIRS] * mask[:PAIRS]).sum() / mask[:PAIRS].sum()  # CrossEntropyLoss's token mean
    return logps[:PAIRS], logps[PAIRS:], nll


def _trl_reference_free(trainer_class, policy, mask, averaged, **attributes):
    """TRL's get_batch_loss_metrics with its forward replaced by these log-probs (logits: unused zeros)."""
    token_logps = policy.clone().requires_grad_(True)
    chosen, rejected, nll = _sequence_stats(token_logps, mask, averaged)
    zeros = torch.zeros(PAIRS, LENGTH, 2, dtype=torch.float64)
    trainer = types.SimpleNamespace(accelerator=_Accelerator(), aux_loss_enabled=False, **attributes)
    trainer.concatenated_forward = lambda model, batch: (chosen, rejected, zeros, zeros, nll)
    for method in ("cpo_loss", "odds_ratio_loss"):
        if hasattr(trainer_class, method):
            setattr(trainer, method, types.MethodType(getattr(trainer_class, method), trainer))
    loss, metrics = trainer_class.get_batch_loss_metrics(trainer, None, {})
    loss.backward()
    return float(loss.detach()), metrics, token_logps.grad


@pytest.mark.parametrize("name,cpo_alpha,smoothing", [("simpo", 0.0, 0.0), ("simpo", 0.5, 0.1), ("cpo", 1.0, 0.0),
                                                      ("cpo", 0.3, 0.2)])
def test_cpo_and_simpo_equal_trl_cpo_trainer(name, cpo_alpha, smoothing):
    policy, _, mask = _data(8)
    params = dict(beta=2.0, simpo_gamma=0.7, cpo_alpha=cpo_alpha, label_smoothing=smoothing)
    loss, metrics, grad = _dpoc(_objective([name], **params), policy, None, mask)
    trl_loss, trl_metrics, trl_grad = _trl_reference_free(
        trl_cpo.CPOTrainer, policy, mask, averaged=name == "simpo", beta=2.0, simpo_gamma=0.7, cpo_alpha=cpo_alpha,
        label_smoothing=smoothing, alpha=0.0, loss_type="simpo" if name == "simpo" else "sigmoid")
    assert loss == pytest.approx(trl_loss, **TOL)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-6, atol=1e-10)
    for key in REWARDS:
        assert metrics[key] == pytest.approx(trl_metrics[key], **TOL), key
    if cpo_alpha:  # TRL computes (and logs) the NLL only when it is weighted
        assert metrics["nll_loss"] == pytest.approx(trl_metrics["nll_loss"], **TOL)


def test_orpo_equals_trl_orpo_trainer():
    policy, _, mask = _data(9)
    loss, metrics, grad = _dpoc(_objective(["orpo"], beta=0.25), policy, None, mask)
    trl_loss, trl_metrics, trl_grad = _trl_reference_free(trl_orpo.ORPOTrainer, policy, mask, averaged=True,
                                                          beta=0.25)
    assert loss == pytest.approx(trl_loss, **TOL)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-6, atol=1e-10)
    for key in (*REWARDS, "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert metrics[key] == pytest.approx(trl_metrics[key], **TOL), key


def test_every_contract_loss_is_tested_here():
    """A loss added to the contract without a TRL comparison fails here (kto: test_losses_kto.py)."""
    assert set(PAIRED) | {"simpo", "cpo", "orpo"} == set(losses.NAMES) - set(losses.UNPAIRED)
