"""What every preference loss reads: one micro-batch's pairs as sequence log-probs, and the loss parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Params:
    """The loss parameters, as megatron.args gives them (dpoc.contract.losses says which loss reads which)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    cpo_alpha: float = 0.0
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0


@dataclass(frozen=True)
class Pairs:
    """n pairs of one micro-batch. `chosen`/`rejected`: the policy's sequence log-probs [n] (summed, LD-weighted
    where asked, averaged for the losses that average); `ref_*`: the reference's, alike (None: reference-free);
    `*_tokens`: response lengths [n]; `chosen_nll`: the chosen tokens' mean negative log-likelihood over the
    micro-batch (a scalar, as TRL's SFT and NLL terms)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    chosen_nll: torch.Tensor

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected
