"""What one sample of a global batch costs the planner's models.

A DPO pair is two sequences the policy trains on. With the live reference (`dpo.reference: live`) the frozen
reference is held on every device (weights) and runs a forward pass over the same two sequences in every
step; with precomputed reference log-probs (`precomputed`) or a reference-free loss (`none`) neither: the
precompute pass of `precomputed` (`REFERENCE_PASS`, forward only, once over the dataset) is modelled on its
own. Pretraining sequences calibrate the model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    sequences_per_sample: int
    reference_forward: bool  # the frozen reference is held and runs forward in every step
    trains: bool = True  # forward and backward; False: forward only (the precompute pass)

    @property
    def pairwise(self) -> bool:
        return self.sequences_per_sample == 2


DPO_LIVE = Workload(sequences_per_sample=2, reference_forward=True)
DPO_PRECOMPUTED = Workload(sequences_per_sample=2, reference_forward=False)
PRETRAIN = Workload(sequences_per_sample=1, reference_forward=False)
REFERENCE_PASS = Workload(sequences_per_sample=2, reference_forward=False, trains=False)
# a reference-free loss (simpo, cpo, orpo) costs what precomputed log-probs cost in a step, with no precompute pass
REFERENCE_MODES = {"live": DPO_LIVE, "precomputed": DPO_PRECOMPUTED, "none": DPO_PRECOMPUTED}


def dpo_workload(reference: str) -> Workload:
    """The training step's workload for `dpo.reference`."""
    return REFERENCE_MODES[reference]
