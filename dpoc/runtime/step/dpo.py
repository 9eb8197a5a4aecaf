"""The preference objective of one micro-batch: per-token log-probs → per-sequence log-probs → the chosen
losses (`dpoc.runtime.losses`, TRL 1.16's definitions) added with their weights → the metrics TRL logs.

A micro-batch holds `n` pairs as 2n sequences ordered [chosen_1..n, rejected_1..n]. Each sequence's
log-prob is the sum over its response tokens; with LD-DPO (`--dpoc-ld-alpha a`) the tokens past the pair's
shorter response count `a` times; simpo and orpo average it over the response. `--pref-ftx w` adds TRL's
`sft` term with weight w (RPO). The SFT and NLL terms are the mean over the micro-batch's chosen tokens.

kto's micro-batch holds n unpaired completions laid out the same way, [completion_1..n, KL_1..n]
(`unpaired.py`), with their labels; its KL estimate is averaged over the data-parallel ranks that run their
j-th micro-batch together, as TRL averages it over its processes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state

from dpoc.contract import losses
from dpoc.runtime.losses import FUNCTIONS, Pairs, Params, kto
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
                          args.dpoc_discopop_tau, args.dpoc_simpo_gamma, args.dpoc_cpo_alpha,
                          args.dpoc_kto_desirable_weight, args.dpoc_kto_undesirable_weight),
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
    def unpaired(self) -> bool:
        return losses.unpaired(self.losses)

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """What each micro-batch's metrics hold (summed over its pairs or completions)."""
        return kto.SUM_KEYS if self.unpaired else REWARD_KEYS + EXTRA_KEYS.get(self.losses[0], ())

    def record(self, sums: torch.Tensor, global_batch: int, replicas: int) -> dict[str, float]:
        """The step's metrics from its micro-batches' sums [J, len(metric_keys)], row j added over the
        `replicas` data-parallel ranks' j-th micro-batches: means over the step's pairs (kto: TRL's per-batch
        means, averaged over the batches, `kto.kto_record`)."""
        if self.unpaired:
            return kto.kto_record(sums, replicas)
        return {k: float(v) / global_batch for k, v in zip(self.metric_keys, sums.sum(0).tolist(), strict=True)}

    def sequence_logps(self, token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[2n] sequence log-probs as the losses read them (the reference pass stores the reference's so)."""
        weights = mask if self.ld_alpha is None else ld_weights(mask, self.ld_alpha)
        sums = summed_logps(token_logps, weights)
        return sums / mask.sum(-1).clamp(min=1) if losses.BY_NAME[self.losses[0]].averaged else sums

    def loss_from_tokens(self, token_nll: torch.Tensor, mask: torch.Tensor, reference: torch.Tensor | None,
                         mean_pairs: float, desirable: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
        if self.unpaired:
            return self._kto(policy, reference.detach(), desirable, mean_pairs)
        lengths = mask.sum(-1)
        ref = (None, None) if reference is None else (reference[:n].detach(), reference[n:].detach())
        x = Pairs(policy[:n], policy[n:], *ref, lengths[:n], lengths[n:],
                  (token_nll[:n] * mask[:n]).sum() / mask[:n].sum().clamp(min=1))
        per_pair = sum(weight * FUNCTIONS[name](x, self.params) for name, weight in self.terms)
        return per_pair.sum() / mean_pairs, self._metrics(x, per_pair)

    def _kto(self, policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, mean_pairs: float
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = policy.shape[0] // 2
        x = kto.Completions(policy[:n], reference[:n], desirable, policy[n:], reference[n:])
        kl = kto.kl_estimate(x, _data_parallel_mean)
        per_completion = kto.kto(x, self.params, kl)
        sums = kto.kto_sums(x, self.params, kl, per_completion)
        return per_completion.sum() / mean_pairs, dict(zip(kto.SUM_KEYS, sums.unbind(), strict=True))

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


def _data_parallel_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over this rank's data-parallel group (the identity on one replica)."""
    replicas = parallel_state.get_data_parallel_world_size() if dist.is_initialized() else 1
    if replicas == 1:
        return value
    total = value.clone()
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return total / replicas
