"""DPO objectives on per-sequence log-probabilities (MindSpeed-LLM's formulas), and the metrics they log.

A micro-batch holds `n` pairs as 2n sequences ordered [chosen_1..n, rejected_1..n]. The policy's and the
reference's log-probability of each sequence's response tokens is summed (IPO: averaged over the
response length). With z = (pi_c - pi_r) - (ref_c - ref_r):
  sigmoid: -log s(beta z) (1 - ls) - log s(-beta z) ls
  hinge:   relu(1 - beta z)
  ipo:     (z - 1 / (2 beta))^2
plus, with --pref-ftx w, w times the chosen response's mean token negative log-likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

METRIC_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")


def summed_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sequence, the sum of its response tokens' log-probs (`mask`: 1 on response tokens)."""
    return (token_logps * mask).sum(-1)


@dataclass(frozen=True)
class Objective:
    loss_type: str = "sigmoid"  # sigmoid | hinge | ipo
    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_weight: float = 0.0

    def sequence_logps(self, token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sum (IPO: mean) of response-token log-probs per sequence; `mask` is 1 on response tokens."""
        return self.normalized(summed_logps(token_logps, mask), mask)

    def normalized(self, sums: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-sequence sums of response-token log-probs as the loss takes them: IPO averages them."""
        return sums / mask.sum(-1).clamp(min=1) if self.loss_type == "ipo" else sums

    def loss_from_tokens(self, token_nll: torch.Tensor, mask: torch.Tensor, reference_sums: torch.Tensor,
                         mean_pairs: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss from the policy's per-token negative log-likelihoods [2n, L] (vocab-parallel cross
        entropy), the response mask and the reference's summed sequence log-probs (live or precomputed)."""
        n = token_nll.shape[0] // 2
        chosen_nll = (token_nll[:n] * mask[:n]).sum(-1) / mask[:n].sum(-1).clamp(min=1)
        return self.loss(self.sequence_logps(-token_nll, mask), self.normalized(reference_sums, mask), chosen_nll,
                         mean_pairs)

    def loss(self, policy: torch.Tensor, reference: torch.Tensor, chosen_nll: torch.Tensor, mean_pairs: float
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's per-pair losses summed and divided by `mean_pairs`, and the metrics summed over
        its pairs (the step divides them by its pair count).

        megatron's schedule divides each micro-batch's loss by the rank's micro-batch count and data
        parallelism averages over ranks, so with `mean_pairs` = the step's pairs per micro-batch the update
        follows the mean over all pairs of the step, however many pairs each micro-batch holds (packing).
        `policy`/`reference`: [2n] sequence log-probs, chosen first. `chosen_nll`: [n] mean token NLL of
        each chosen response under the policy (the SFT term)."""
        n = policy.shape[0] // 2
        pi_c, pi_r = policy[:n], policy[n:]
        ref_c, ref_r = reference[:n].detach(), reference[n:].detach()
        z = (pi_c - pi_r) - (ref_c - ref_r)
        if self.loss_type == "sigmoid":
            losses = (-F.logsigmoid(self.beta * z) * (1 - self.label_smoothing)
                      - F.logsigmoid(-self.beta * z) * self.label_smoothing)
        elif self.loss_type == "hinge":
            losses = torch.relu(1 - self.beta * z)
        elif self.loss_type == "ipo":
            losses = (z - 1 / (2 * self.beta)) ** 2
        else:
            raise ValueError(f"unknown DPO loss type {self.loss_type!r}")
        if self.sft_weight:
            losses = losses + self.sft_weight * chosen_nll
        chosen_rewards = self.beta * (pi_c - ref_c).detach()
        rejected_rewards = self.beta * (pi_r - ref_r).detach()
        metrics = {
            "loss": losses.detach().sum(),
            "rewards/chosen": chosen_rewards.sum(),
            "rewards/rejected": rejected_rewards.sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "logps/chosen": pi_c.detach().sum(),
            "logps/rejected": pi_r.detach().sum(),
        }
        return losses.sum() / mean_pairs, metrics
