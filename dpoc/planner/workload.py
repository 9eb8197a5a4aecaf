"""What one sample of a global batch costs the planner's models.

A DPO pair is two sequences the policy trains on. With the live reference (`dpo.reference: live`) the frozen
reference is held on every device (weights) and runs a forward pass over the same two sequences in every
step; with precomputed reference log-probs (`precomputed`) or a reference-free loss (`none`) neither: the
precompute pass of `precomputed` (`REFERENCE_PASS`, forward only, once over the dataset) is modelled on its
own. Pretraining sequences calibrate the model. Under LoRA (`lora`) the policy is the frozen base plus trained
adapters, and the live reference is the same model with its adapters off: its forward still runs, but no
second copy of the weights is held unless `checkpoint.ref_model` names another model (`ref_model`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dpoc.contract.lora import Lora


@dataclass(eq=False, repr=False)  # an intermediate: not frozen, compared by identity, no repr (one method to compile)
class Workload:
    """What one step runs per sample: sequences, reference forward, training or forward only."""
    sequences_per_sample: int
    reference_forward: bool  # the frozen reference runs forward in every step (held: `reference_weights`)
    trains: bool = True  # forward and backward; False: forward only (the precompute pass)
    lora: Lora | None = None  # LoRA: the base is frozen, only the adapters train
    ref_model: bool = False  # under LoRA, the reference is another model (checkpoint.ref_model), held as today

    @property
    def reference_weights(self) -> bool:
        """A frozen reference model is held beside the policy."""
        return self.reference_forward and (self.lora is None or self.ref_model)

    @property
    def pairwise(self) -> bool:
        return self.sequences_per_sample == 2


DPO_LIVE = Workload(sequences_per_sample=2, reference_forward=True)
DPO_PRECOMPUTED = Workload(sequences_per_sample=2, reference_forward=False)
PRETRAIN = Workload(sequences_per_sample=1, reference_forward=False)
REFERENCE_PASS = Workload(sequences_per_sample=2, reference_forward=False, trains=False)
# a reference-free loss (simpo, cpo, orpo) costs what precomputed log-probs cost in a step, with no precompute pass
REFERENCE_MODES = {"live": DPO_LIVE, "precomputed": DPO_PRECOMPUTED, "none": DPO_PRECOMPUTED}


def dpo_workload(reference: str, lora: Lora | None = None, ref_model: bool = False) -> Workload:
    """The training step's workload for `dpo.reference`, LoRA's adapters and its own reference model."""
    return replace(REFERENCE_MODES[reference], lora=lora, ref_model=ref_model and lora is not None)
