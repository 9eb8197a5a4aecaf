"""The preference losses dpoc trains with, in one list that the recipe schema, the resolver, megatron.args and
the runtime all read (a loss, its parameters and whether it needs a reference are stated once).

The definitions are TRL 1.16's: DPOTrainer's `loss_type`s, CPOTrainer's (sigmoid as `cpo`, simpo),
ORPOTrainer's and KTOTrainer's kto (unpaired completions). `dpoc.runtime.losses` computes them;
tests/runtime/test_losses_trl.py and test_losses_kto.py check each against TRL.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Loss:
    """One preference loss: what it needs and its TRL equivalent."""
    name: str
    reference: bool  # needs the frozen reference's log-probs (live or precomputed)
    params: tuple[str, ...]  # the dpo.* fields it reads besides beta
    trl: str  # its TRL equivalent
    f_divergence: bool = False  # takes dpo.f_divergence_type (TRL: built on the reward difference)
    mindspeed: bool = False  # MindSpeed-LLM's DPO has it (the mindspeed-rl target renders it)
    averaged: bool = False  # reads each sequence's log-prob averaged over its tokens (TRL: average_log_prob)
    unpaired: bool = False  # trains on unpaired completions, each labelled desirable or not (KTO), not on pairs


_DPO = "DPOTrainer loss_type="
LOSSES: tuple[Loss, ...] = (
    Loss("sigmoid", True, ("label_smoothing",), _DPO + "sigmoid (label smoothing: cDPO)", True, True),
    Loss("hinge", True, (), _DPO + "hinge", True, True),
    Loss("ipo", True, (), _DPO + "ipo", True, True),
    Loss("exo_pair", True, ("label_smoothing",), _DPO + "exo_pair", True),
    Loss("nca_pair", True, (), _DPO + "nca_pair"),
    Loss("robust", True, ("label_smoothing",), _DPO + "robust", True),
    Loss("bco_pair", True, (), _DPO + "bco_pair"),
    Loss("sppo_hard", True, (), _DPO + "sppo_hard"),
    Loss("aot", True, ("label_smoothing",), _DPO + "aot"),
    Loss("aot_unpaired", True, ("label_smoothing",), _DPO + "aot_unpaired"),
    Loss("apo_zero", True, (), _DPO + "apo_zero"),
    Loss("apo_down", True, (), _DPO + "apo_down"),
    Loss("discopop", True, ("discopop_tau",), _DPO + "discopop", True),
    Loss("sft", True, (), _DPO + "sft (with sigmoid: RPO)", True),
    Loss("sigmoid_norm", True, (), _DPO + "sigmoid_norm", True),
    Loss("simpo", False, ("simpo_gamma", "cpo_alpha", "label_smoothing"), "CPOTrainer loss_type=simpo",
         averaged=True),
    Loss("cpo", False, ("cpo_alpha", "label_smoothing"), "CPOTrainer loss_type=sigmoid"),
    Loss("orpo", False, (), "ORPOTrainer", averaged=True),
    Loss("kto", True, ("kto_desirable_weight", "kto_undesirable_weight"), "KTOTrainer loss_type=kto",
         unpaired=True),
)
BY_NAME = {loss.name: loss for loss in LOSSES}
NAMES = tuple(BY_NAME)
REFERENCE_FREE = tuple(loss.name for loss in LOSSES if not loss.reference)
UNPAIRED = tuple(loss.name for loss in LOSSES if loss.unpaired)
PAIRED = tuple(name for name in NAMES if name not in UNPAIRED)
TRAINED = NAMES  # what the dpoc runtime trains: every loss (kto on the unpaired dataset, alone)


def unpaired(names: tuple[str, ...]) -> bool:
    """Whether the chosen losses train on unpaired completions (kto), hence on the unpaired dataset."""
    return any(name in UNPAIRED for name in names)

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# TRL's defaults for the parameters (CPOConfig's cpo_alpha is 1.0; with simpo TRL's docs use 0)
DEFAULT_DISCOPOP_TAU = 0.05
DEFAULT_SIMPO_GAMMA = 0.5
DEFAULT_F_ALPHA = 0.5
DEFAULT_CPO_ALPHA = {"cpo": 1.0, "simpo": 0.0}
