"""KTO (TRL 1.16 KTOTrainer, loss_type=kto) on unpaired completions: each completion is desirable or not, and
its reward beta x log(pi/ref) is compared with a reference point, the KL of policy to reference estimated on
mismatched (prompt, completion) pairs of the same batch. The estimate is detached and clamped at 0 after it
is averaged over the data-parallel ranks, so every rank trains against the same reference point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dpoc.runtime.losses.inputs import Params


@dataclass(frozen=True)
class Completions:
    """n unpaired completions of one batch: the policy's and the reference's summed sequence log-probs [n],
    `desirable` [n] (bool, the dataset's label), and both models' log-probs of the KL batch [n] (each prompt
    with another example's completion, `kl_partners`)."""

    logps: torch.Tensor
    ref_logps: torch.Tensor
    desirable: torch.Tensor
    kl_logps: torch.Tensor
    ref_kl_logps: torch.Tensor


def kl_partners(n: int, batch_size: int) -> list[int]:
    """For each of n examples in order, the example whose completion its prompt gets in the KL batch: each run
    of `batch_size` examples (the last one may be shorter) is rotated by one, (x_1, y_k), (x_2, y_1), ...,
    (x_k, y_{k-1}), as TRL's KTOTrainer builds it, so the KL batch's completions are the batch's own."""
    out = []
    for start in range(0, n, batch_size):
        run = list(range(start, min(start + batch_size, n)))
        out += run[-1:] + run[:-1]
    return out


def kl_estimate(x: Completions, average: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
    """The batch's KL reference point: the mean log-ratio on the KL batch, detached, averaged over the ranks by
    `average` (a data-parallel mean of a scalar; identity on one rank), then clamped at 0."""
    return average((x.kl_logps - x.ref_kl_logps).mean().detach()).clamp(min=0)


def kto(x: Completions, p: Params, kl: torch.Tensor) -> torch.Tensor:
    """One loss per completion [n]: w_d (1 - sigmoid(beta (r - kl))) if desirable, else
    w_u (1 - sigmoid(beta (kl - r))), r the log-ratio; the batch's loss is their mean."""
    logratios = x.logps - x.ref_logps
    sign = torch.where(x.desirable, 1.0, -1.0).to(logratios.dtype)
    weight = torch.where(x.desirable, p.kto_desirable_weight, p.kto_undesirable_weight).to(logratios.dtype)
    return weight * (1 - torch.sigmoid(p.beta * sign * (logratios - kl)))


# what one micro-batch contributes to its step's metrics, summed over its completions (`kto_sums`)
SUM_KEYS = ("loss", "kl", "rewards/chosen", "logps/chosen", "count/chosen", "rewards/rejected", "logps/rejected",
            "count/rejected")


def kto_sums(x: Completions, p: Params, kl: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """[len(SUM_KEYS)]: the completions' summed loss, the batch's KL estimate, and per side (chosen: desirable)
    the summed reward, summed log-prob and count."""
    rewards = p.beta * (x.logps - x.ref_logps).detach()
    out = [losses.detach().sum(), kl.detach()]
    for rows in (x.desirable, ~x.desirable):
        out += [rewards[rows].sum(), x.logps.detach()[rows].sum(), rows.sum()]
    return torch.stack([t.to(rewards.dtype) for t in out])


def kto_record(sums: torch.Tensor, replicas: int) -> dict[str, float]:
    """TRL's KTO metrics of a step from its micro-batches' `kto_sums` [J, len(SUM_KEYS)], each row added over the
    `replicas` data-parallel ranks that ran their j-th micro-batch together (TRL's one batch per process): per
    such batch the reward and log-prob means over all its chosen (rejected) completions, the KL (the same on
    every rank), and their margin where both sides are present; then the mean over the batches, as TRL's log
    averages its per-batch values. `loss` is the mean over every completion of the step."""
    column = dict(zip(SUM_KEYS, sums.double().unbind(-1), strict=True))
    out = {"loss": float(column["loss"].sum() / (column["count/chosen"] + column["count/rejected"]).sum()),
           "kl": float(column["kl"].mean() / replicas)}
    present = {}
    for side in ("chosen", "rejected"):
        present[side] = column[f"count/{side}"] > 0
        count = column[f"count/{side}"].clamp(min=1)
        for key in (f"rewards/{side}", f"logps/{side}"):
            if present[side].any():
                out[key] = float((column[key] / count)[present[side]].mean())
    both = present["chosen"] & present["rejected"]
    if both.any():
        margins = column["rewards/chosen"] / column["count/chosen"].clamp(min=1) \
            - column["rewards/rejected"] / column["count/rejected"].clamp(min=1)
        out["rewards/margins"] = float(margins[both].mean())
    return out


def kto_metrics(x: Completions, p: Params, kl: torch.Tensor) -> dict[str, float]:
    """TRL's KTO metrics for one batch on one rank: the KL estimate, and the mean reward and log-prob over the
    desirable (chosen) and the undesirable (rejected) completions, each present only where the batch has some."""
    record = kto_record(kto_sums(x, p, kl, kto(x, p, kl))[None], 1)
    del record["loss"]
    return record
