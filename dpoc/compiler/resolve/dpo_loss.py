"""The recipe's `dpo` section → the Plan's `DPO`: the loss list, its parameters and the reference it needs.

A parameter that no chosen loss reads is refused rather than ignored (a typo'd loss would otherwise train
something else silently), and so is a reference setting given with a reference-free loss, which builds none.
The losses and the fields each reads come from `dpoc.contract.losses`. kto trains alone, on the unpaired
dataset (the build's preprocessing writes it), with none of the pair-only options.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dpoc.contract import losses
from dpoc.contract.plan import DPO

_REFERENCE_FIELDS = ("dpo.reference", "dpo.reference_micro_batch_size", "checkpoint.ref_model")


def dpo_settings(v: Any) -> DPO:
    """`v`: the resolver's value reader (take, has, problem). Problems are recorded on it, not raised."""
    given = v.take("dpo.loss", "sigmoid", why="the standard DPO loss")
    names = (given,) if isinstance(given, str) else tuple(given)
    free = [n for n in names if not losses.BY_NAME[n].reference]
    if losses.unpaired(names) and len(names) > 1:
        v.problem("dpo.loss", f"{names}: kto trains on unpaired completions and cannot be added to other losses "
                  "(valid: kto alone, or a list of paired losses)")
    if free and len(names) > 1:
        v.problem("dpo.loss", f"{names}: {free[0]} is reference-free and cannot be added to other losses "
                  "(valid: one reference-free loss alone, or a list of reference losses)")
    cpo_default = losses.DEFAULT_CPO_ALPHA.get(names[0], 0.0)
    dpo = DPO(
        loss=names,
        beta=float(v.take("dpo.beta", 0.1, why="MindSpeed-LLM's and TRL's default")),
        label_smoothing=float(v.take("dpo.label_smoothing", 0.0, why="no label smoothing")),
        sft_weight=float(v.take("dpo.sft_weight", 0.0, why="no SFT term")),
        reference=_reference(v, free),
        reference_micro_batch_size=v.take("dpo.reference_micro_batch_size", None, rule="planner",
                                          why="the precompute pass's largest micro-batch that fits (precomputed only)"),
        loss_weights=tuple(float(w) for w in v.take("dpo.loss_weights", (), why="1 for each loss")),
        ld_alpha=_optional_float(v.take("dpo.ld_alpha", None, why="no length desensitisation")),
        f_divergence_type=v.take("dpo.f_divergence_type", "reverse_kl", why="standard DPO's reverse KL"),
        f_alpha_divergence_coef=float(v.take("dpo.f_alpha_divergence_coef", losses.DEFAULT_F_ALPHA,
                                             why="TRL's default")),
        discopop_tau=float(v.take("dpo.discopop_tau", losses.DEFAULT_DISCOPOP_TAU, why="TRL's default")),
        simpo_gamma=float(v.take("dpo.simpo_gamma", losses.DEFAULT_SIMPO_GAMMA, why="TRL's default")),
        cpo_alpha=float(v.take("dpo.cpo_alpha", cpo_default, why="TRL's default for this loss")),
        kto_desirable_weight=float(v.take("dpo.kto_desirable_weight", 1.0, why="TRL's default")),
        kto_undesirable_weight=float(v.take("dpo.kto_undesirable_weight", 1.0, why="TRL's default")),
    )
    for field, message in _problems(v, dpo):
        v.problem(field, message)
    return dpo


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _reference(v: Any, free: list[str]) -> str:
    if not free:
        return v.take("dpo.reference", "live", why="the frozen reference runs forward in every step, as in "
                      "MindSpeed-LLM")
    for field in _REFERENCE_FIELDS:
        if v.has(field):
            v.problem(field, f"{free[0]} is reference-free: no reference is built, loaded or run (valid: leave "
                      f"{field} out, or a loss with a reference such as sigmoid)")
    return v.derived("dpo.reference", "none", "dpo.loss", f"{free[0]} is reference-free")


def _readers(names: tuple[str, ...], param: str) -> list[str]:
    return [n for n in names if param in losses.BY_NAME[n].params]


def _problems(v: Any, d: DPO) -> Iterator[tuple[str, str]]:
    names, shown = d.loss, ", ".join(d.loss)
    if d.loss_weights and len(d.loss_weights) != len(names):
        yield "dpo.loss_weights", (f"{len(d.loss_weights)} weights for {len(names)} losses ({shown}); valid: one "
                                   "weight per dpo.loss entry")
    for param in ("label_smoothing", "discopop_tau", "simpo_gamma", "cpo_alpha", "kto_desirable_weight",
                  "kto_undesirable_weight"):
        if v.has(f"dpo.{param}") and not _readers(names, param) and (param != "label_smoothing" or d.label_smoothing):
            readers = [loss.name for loss in losses.LOSSES if param in loss.params]
            yield f"dpo.{param}", (f"no chosen loss reads it (loss: {shown}); valid: leave it out, or a loss in "
                                   f"{readers}")
    if "exo_pair" in names and d.label_smoothing <= 0:
        yield "dpo.label_smoothing", "exo_pair needs EXO's epsilon above 0 (valid: e.g. 0.001, as the EXO paper)"
    if "robust" in names and d.label_smoothing >= 0.5:
        yield "dpo.label_smoothing", (f"{d.label_smoothing:g}: robust's flip probability must be below 0.5 "
                                      "(valid: 0 <= label_smoothing < 0.5)")
    if d.sft_weight and ("sft" in names or d.reference == "none"):
        instead = "the weight of sft in dpo.loss_weights" if "sft" in names else "dpo.cpo_alpha"
        if "orpo" in names:
            instead = "nothing: orpo's loss holds the NLL"
        yield "dpo.sft_weight", f"{d.sft_weight:g}: loss {shown} already has an NLL term (valid: 0; use {instead})"
    unsupported = [n for n in names if not losses.BY_NAME[n].f_divergence]
    if d.f_divergence_type != "reverse_kl" and unsupported:
        having = [loss.name for loss in losses.LOSSES if loss.f_divergence]
        yield "dpo.f_divergence_type", (f"{d.f_divergence_type}: has no f-divergence form for {unsupported} "
                                        f"(valid: reverse_kl, or losses among {having})")
    if v.has("dpo.f_alpha_divergence_coef") and d.f_divergence_type != "alpha_divergence":
        yield "dpo.f_alpha_divergence_coef", "applies to f_divergence_type alpha_divergence only (valid: leave it out)"
    if losses.unpaired(names):
        for field, given in (("dpo.ld_alpha", d.ld_alpha is not None), ("dpo.sft_weight", d.sft_weight != 0)):
            if given:
                yield field, "kto trains on unpaired completions, and this weights pairs (valid: leave it out)"
    if d.ld_alpha is not None and d.reference == "none":
        yield "dpo.ld_alpha", f"LD-DPO weights a reference loss; {shown} is reference-free (valid: leave it out)"
    if d.ld_alpha is not None and d.reference == "precomputed":
        yield "dpo.ld_alpha", ("the precomputed reference file holds whole-sequence sums, and LD-DPO splits each at "
                               "the shorter response (valid: dpo.reference live, or leave ld_alpha out)")
