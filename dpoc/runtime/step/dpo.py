"""The preference objective of one micro-batch: per-token log-probs → per-sequence log-probs → the chosen
losses (`dpoc.runtime.losses`, TRL 1.16's definitions) added with their weights → the metrics TRL logs.

A micro-batch holds `n` pairs as 2n sequences ordered [chosen_1..n, rejected_1..n]. Each sequence's
log-prob is the sum over its response tokens; with LD-DPO (`--dpoc-ld-alpha a`) the tokens past the pair's
shorter response count `a` times; simpo and orpo average it over the response. `--pref-ftx w` adds TRL's
`sft` term with weight w (RPO). The SFT and NLL terms are the mean over the micro-batch's chosen tokens.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from dpoc.contract import losses
from dpoc.runtime.losses import FUNCTIONS, Pairs, Params
from dpoc.runtime.losses.reference_free import log_odds

REWARD_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")
EXTRA_KEYS = {"cpo": ("nll_loss",), "simpo": ("nll_loss",), "orpo": ("nll_loss", "log_odds_ratio",
                                                                     "log_odds_chosen")}


def summed_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sequence, the sum of its response tokens' log-probs (`mask`: 1 on response tokens)."""
    return (token_logps * mask).sum(-1)


def ld_weights(mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO's token weights [2n, L]: 1 on the first min(|chosen|, |rejected|) response tokens of each
    sequence of a pair, `alpha` past them, 0 off the response."""
    n = mask.shape[0] // 2
    position = mask.cumsum(-1)
    lengths = mask.sum(-1)
    shared = torch.minimum(lengths[:n], lengths[n:]).repeat(2).unsqueeze(-1)
    return mask * torch.where(position <= shared, 1.0, alpha)


@dataclass(frozen=True)
class Objective:
    losses: tuple[str, ...] = ("sigmoid",)
    params: Params = field(default_factory=Params)
    weights: tuple[float, ...] = ()  # one per loss; empty: 1 each
    sft_weight: float = 0.0  # an sft term of this weight (RPO's alpha)
    ld_alpha: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Objective:
        return cls(tuple(args.dpo_loss_type),
                   Params(args.dpo_beta, args.dpo_label_smoothing, args.dpoc_f_divergence, args.dpoc_f_alpha,
                          args.dpoc_discopop_tau, args.dpoc_simpo_gamma, args.dpoc_cpo_alpha),
                   tuple(args.dpoc_loss_weights), args.pref_ftx, args.dpoc_ld_alpha)

    @property
    def terms(self) -> tuple[tuple[str, float], ...]:
        """(loss, weight) pairs, the SFT weight as one more term."""
        out = tuple(zip(self.losses, self.weights or (1.0,) * len(self.losses), strict=True))
        return out + ((("sft", self.sft_weight),) if self.sft_weight else ())

    @property
    def reference_free(self) -> bool:
        return not losses.BY_NAME[self.losses[0]].reference

    @property
    def metric_keys(self) -> tuple[str, ...]:
        return REWARD_KEYS + EXTRA_KEYS.get(self.losses[0], ())

    def sequence_logps(self, token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[2n] sequence log-probs as the losses read them (the reference pass stores the reference's so)."""
        weights = mask if self.ld_alpha is None else ld_weights(mask, self.ld_alpha)
        sums = summed_logps(token_logps, weights)
        return sums / mask.sum(-1).clamp(min=1) if losses.BY_NAME[self.losses[0]].averaged else sums

    def loss_from_tokens(self, token_nll: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor | None,
                         mean_pairs: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss from the policy's per-token negative log-likelihoods [2n, L] (vocab-parallel cross
        entropy), the response mask and the reference's sequence log-probs (`sequence_logps`, live or
        precomputed; None for a reference-free loss).

        The micro-batch's per-pair losses are summed and divided by `mean_pairs`, and the metrics summed over
        its pairs (the step divides them by its pair count): megatron's schedule divides each micro-batch's
        loss by the rank's micro-batch count and data parallelism averages over ranks, so with `mean_pairs` =
        the step's pairs per micro-batch the update follows the mean over all pairs of the step, however many
        pairs each micro-batch holds (packing)."""
        n = token_nll.shape[0] // 2
        policy = self.sequence_logps(-token_nll, mask)
        lengths = mask.sum(-1)
        ref = (None, None) if reference is None else (reference[:n].detach(), reference[n:].detach())
        x = Pairs(policy[:n], policy[n:], *ref, lengths[:n], lengths[n:],
                  (token_nll[:n] * mask[:n]).sum() / mask[:n].sum().clamp(min=1))
        per_pair = sum(weight * FUNCTIONS[name](x, self.params) for name, weight in self.terms)
        return per_pair.sum() / mean_pairs, self._metrics(x, per_pair)

    def _metrics(self, x: Pairs, per_pair: torch.Tensor) -> dict[str, torch.Tensor]:
        """TRL's metrics, summed over the pairs: rewards are beta x the log-ratios (reference-free: beta x the
        policy's log-probs, as CPOTrainer and ORPOTrainer log them)."""
        beta, n = self.params.beta, x.chosen.shape[0]
        chosen, rejected = x.chosen.detach(), x.rejected.detach()
        if not self.reference_free:
            chosen, rejected = chosen - x.ref_chosen, rejected - x.ref_rejected
        out = {
            "loss": per_pair.detach().sum(),
            "rewards/chosen": beta * chosen.sum(),
            "rewards/rejected": beta * rejected.sum(),
            "rewards/accuracies": (chosen > rejected).float().sum(),
            "rewards/margins": beta * (chosen - rejected).sum(),
            "logps/chosen": x.chosen.detach().sum(),
            "logps/rejected": x.rejected.detach().sum(),
        }
        if "nll_loss" in self.metric_keys:
            out["nll_loss"] = x.chosen_nll.detach() * n
        if self.losses[0] == "orpo":
            odds = log_odds(x).detach()
            out["log_odds_ratio"] = F.logsigmoid(odds).sum()
            out["log_odds_chosen"] = odds.sum()
        return out
