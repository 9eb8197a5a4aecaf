"""The paired losses with a reference, TRL 1.16 DPOTrainer's `loss_type`s: each maps a micro-batch's pairs to
one loss per pair [n]. Those built on the reward difference see the log-ratios through f-DPO's divergence
(`scores`); IPO and sigmoid_norm divide the scores by each response's length, as TRL does."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpoc.runtime.losses.inputs import Pairs, Params


def scores(logratios: torch.Tensor, p: Params) -> torch.Tensor:
    """f'(pi/ref) of f-DPO: the log-ratio itself for reverse KL (standard DPO)."""
    if p.f_divergence == "forward_kl":
        return 1 - torch.exp(-logratios)
    if p.f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if p.f_divergence == "alpha_divergence" and abs(p.f_alpha - 1) >= 1e-6:
        return torch.expm1((p.f_alpha - 1) * logratios) / (p.f_alpha - 1)
    return logratios


def _delta(x: Pairs, p: Params) -> torch.Tensor:
    return scores(x.chosen_logratios, p) - scores(x.rejected_logratios, p)


def _delta_per_token(x: Pairs, p: Params) -> torch.Tensor:
    return (scores(x.chosen_logratios, p) / x.chosen_tokens.clamp(min=1)
            - scores(x.rejected_logratios, p) / x.rejected_tokens.clamp(min=1))


def smoothed(z: torch.Tensor, eps: float) -> torch.Tensor:
    """cDPO: the preference is flipped with probability eps."""
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def sigmoid(x: Pairs, p: Params) -> torch.Tensor:
    return smoothed(p.beta * _delta(x, p), p.label_smoothing)


def hinge(x: Pairs, p: Params) -> torch.Tensor:
    return torch.relu(1 - p.beta * _delta(x, p))


def ipo(x: Pairs, p: Params) -> torch.Tensor:
    return (_delta_per_token(x, p) - 1 / (2 * p.beta)) ** 2


def sigmoid_norm(x: Pairs, p: Params) -> torch.Tensor:
    return -F.logsigmoid(p.beta * _delta_per_token(x, p))


def exo_pair(x: Pairs, p: Params) -> torch.Tensor:
    """KL(softmax of the scaled rewards over the pair || [1 - eps, eps])."""
    z = p.beta * _delta(x, p)
    eps = p.label_smoothing
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def robust(x: Pairs, p: Params) -> torch.Tensor:
    """The unbiased estimate under label flips with probability eps."""
    z, eps = p.beta * _delta(x, p), p.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def discopop(x: Pairs, p: Params) -> torch.Tensor:
    """A blend of the logistic and the exponential loss, mixed by sigmoid(z / tau)."""
    z = p.beta * _delta(x, p)
    mix = torch.sigmoid(z / p.discopop_tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


def nca_pair(x: Pairs, p: Params) -> torch.Tensor:
    chosen, rejected = p.beta * x.chosen_logratios, p.beta * x.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def bco_pair(x: Pairs, p: Params) -> torch.Tensor:
    return -F.logsigmoid(p.beta * x.chosen_logratios) - F.logsigmoid(-p.beta * x.rejected_logratios)


def sppo_hard(x: Pairs, p: Params) -> torch.Tensor:
    return (x.chosen_logratios - 0.5 / p.beta) ** 2 + (x.rejected_logratios + 0.5 / p.beta) ** 2


def apo_zero(x: Pairs, p: Params) -> torch.Tensor:
    return 1 - torch.sigmoid(p.beta * x.chosen_logratios) + torch.sigmoid(p.beta * x.rejected_logratios)


def apo_down(x: Pairs, p: Params) -> torch.Tensor:
    return (torch.sigmoid(p.beta * x.chosen_logratios)
            + 1 - torch.sigmoid(p.beta * (x.chosen_logratios - x.rejected_logratios)))


def aot(x: Pairs, p: Params) -> torch.Tensor:
    """The policy's and the reference's margins, each sorted over the micro-batch, compared in order."""
    policy = torch.sort(x.chosen - x.rejected).values
    reference = torch.sort(x.ref_chosen - x.ref_rejected).values
    return smoothed(p.beta * (policy - reference), p.label_smoothing)


def aot_unpaired(x: Pairs, p: Params) -> torch.Tensor:
    """The chosen and the rejected log-ratios, each sorted over the micro-batch, compared in order."""
    chosen, rejected = torch.sort(x.chosen_logratios).values, torch.sort(x.rejected_logratios).values
    return smoothed(p.beta * (chosen - rejected), p.label_smoothing)


def sft(x: Pairs, p: Params) -> torch.Tensor:
    """The chosen tokens' mean NLL over the micro-batch, the same for every pair."""
    return x.chosen_nll.expand(x.chosen.shape[0])
