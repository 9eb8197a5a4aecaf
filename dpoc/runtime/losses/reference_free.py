"""The reference-free losses: TRL's CPOTrainer (sigmoid as `cpo`, and `simpo`) and ORPOTrainer. They read the
policy alone, so no reference is built or run; simpo and orpo read length-averaged log-probs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpoc.runtime.losses.inputs import Pairs, Params
from dpoc.runtime.losses.paired import smoothed


def _cpo_smoothed(z: torch.Tensor, p: Params, x: Pairs) -> torch.Tensor:
    """CPO's conservative sigmoid loss plus cpo_alpha times the chosen NLL."""
    return smoothed(z, p.label_smoothing) + p.cpo_alpha * x.chosen_nll


def cpo(x: Pairs, p: Params) -> torch.Tensor:
    return _cpo_smoothed(p.beta * (x.chosen - x.rejected), p, x)


def simpo(x: Pairs, p: Params) -> torch.Tensor:
    """SimPO: the averaged log-prob margin must clear gamma / beta."""
    return _cpo_smoothed(p.beta * (x.chosen - x.rejected) - p.simpo_gamma, p, x)


def log_odds(x: Pairs) -> torch.Tensor:
    """log(odds(chosen) / odds(rejected)) with odds(y) = P(y) / (1 - P(y)), P the averaged probability;
    log(1 - P) computed stably on each side of -ln 2."""
    def log1mexp(v: torch.Tensor) -> torch.Tensor:
        return torch.where(v < -0.6931471805599453, torch.log1p(-torch.exp(v)), torch.log(-torch.expm1(v)))

    return (x.chosen - x.rejected) - (log1mexp(x.chosen) - log1mexp(x.rejected))


def orpo(x: Pairs, p: Params) -> torch.Tensor:
    """The chosen NLL minus beta (ORPO's lambda) times log sigmoid of the log-odds ratio."""
    return x.chosen_nll - p.beta * F.logsigmoid(log_odds(x))
