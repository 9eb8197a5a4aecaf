"""LoRA's vocabulary, stated once: which linears can carry an adapter, under megatron-core's and Hugging Face's
names, and the resolved settings the Plan, megatron.args, the runtime, the planner and the exporters share.

megatron-core fuses q/k/v into `linear_qkv` and gate/up into `linear_fc1`, so one megatron target stands for
several HF ones: an adapter on `linear_qkv` is three PEFT adapters (q, k, v) that share A, with B split.
"""

from __future__ import annotations

from dataclasses import dataclass

# megatron-core linear -> the HF linears it fuses, in the order their rows are stacked
MCORE_TO_HF: dict[str, tuple[str, ...]] = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
}
MCORE_TARGETS = tuple(MCORE_TO_HF)
HF_TO_MCORE: dict[str, str] = {hf: mcore for mcore, hfs in MCORE_TO_HF.items() for hf in hfs}
HF_TARGETS = tuple(HF_TO_MCORE)
# column-parallel linears shard their output rows over tp (B is sharded, A replicated); row-parallel ones
# shard their input columns (A is sharded, B replicated)
COLUMN_PARALLEL = ("linear_qkv", "linear_fc1")
ROW_PARALLEL = ("linear_proj", "linear_fc2")


@dataclass(frozen=True)
class Lora:
    """A resolved `lora:` section (its presence turns LoRA on)."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]  # megatron-core names, in MCORE_TARGETS order
    experts: bool  # MoE expert linears get adapters too (one per expert); the router never does
    init_from: str | None  # a PEFT adapter directory to start from

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def hf_targets(self) -> tuple[str, ...]:
        return tuple(hf for target in self.targets for hf in MCORE_TO_HF[target])


def mcore_targets(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The megatron-core linears that `names` (either vocabulary, mixed) select, in MCORE_TARGETS order.

    A fused linear is selected only whole: naming `q_proj` without `k_proj` and `v_proj` cannot be expressed on
    megatron-core's fused `linear_qkv`, so it is refused rather than widened."""
    unknown = [n for n in names if n not in MCORE_TO_HF and n not in HF_TO_MCORE]
    if unknown:
        raise ValueError(
            f"unknown LoRA target {unknown[0]!r}; valid: {', '.join(MCORE_TARGETS + HF_TARGETS)}")
    chosen = {HF_TO_MCORE.get(n, n) for n in names}
    for mcore in chosen:
        parts = MCORE_TO_HF[mcore]
        named = [p for p in parts if p in names]
        if mcore not in names and len(parts) > 1 and len(named) != len(parts):
            missing = [p for p in parts if p not in named]
            raise ValueError(
                f"LoRA target {named[0]!r} without {', '.join(missing)}: megatron-core fuses "
                f"{', '.join(parts)} into {mcore}, so name all of them or {mcore!r}")
    return tuple(t for t in MCORE_TARGETS if t in chosen)
