"""LoRA adapters between megatron-core's form and PEFT's adapter directory, exactly.

The megatron-core form is one (A, B) per `Site` (layer, megatron linear, expert), in global shapes: A
`[r, in]`, B `[out, r]` with B's rows in the fused weight's order. `weight_map.pieces` says which HF rows a
fused weight stacks (q/k/v per query group, `[gate; up]`), and B's rows follow the same table, so:
- out: a fused adapter is one PEFT adapter per HF linear, all sharing A, each with its rows of B;
- in: HF adapters that share A fuse back at rank r; ones with different A fuse exactly only stacked (A's
  concatenated, B block-diagonal, rank k·r), never averaged or refitted;
- routed experts: transformers 5 holds a layer's experts as two 3D parameters (`gate_up_proj`, `down_proj`),
  so their adapters are PEFT's target_parameters, every expert's A and B stacked into one pair per parameter.
Pure functions over tensors (torch only); reading and writing the directory are at the end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dpoc.common.atomic import published_dir
from dpoc.contract.architecture import Architecture
from dpoc.contract.errors import DpocError, Problem
from dpoc.contract.lora import HF_TO_MCORE, MCORE_TO_HF, Lora
from dpoc.runtime.weights import weight_map
from dpoc.runtime.weights.safetensors_out import StreamingSafetensors

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModelForCausalLM's prefix before the HF model's own names


@dataclass(frozen=True)
class Site:
    """Where one megatron-core adapter sits: a layer's linear (`target`, a megatron-core name), or an expert's."""

    layer: int
    target: str
    expert: int = -1  # -1: not an expert linear

    def weight(self) -> tuple[str, tuple[int, ...]]:
        """The megatron weight this adapter updates: its weight_map key and index."""
        if self.expert >= 0:
            return weight_map.EXPERT + f"{self.target}.weight", (self.layer, self.expert)
        module = "self_attention" if self.target in ("linear_qkv", "linear_proj") else "mlp"
        return weight_map.LAYER + f"{module}.{self.target}.weight", (self.layer,)


Pair = tuple[torch.Tensor, torch.Tensor]  # (A [r, in], B [out, r])


def sites(arch: Architecture, lora: Lora) -> list[Site]:
    """Every adapter a model gets under `lora`, in order: each layer's targets, then (with `experts`) each
    expert's fc1/fc2. A MoE layer has no dense linear_fc1/fc2, so those targets apply to its experts only."""
    out = []
    for layer in range(arch.num_layers):
        for target in lora.targets:
            if target in ("linear_qkv", "linear_proj") or not arch.num_experts:
                out.append(Site(layer, target))
        if arch.num_experts and lora.experts:
            out += [Site(layer, t, e) for e in range(arch.num_experts) for t in lora.targets
                    if t in ("linear_fc1", "linear_fc2")]
    return out


def hf_modules(site: Site, arch: Architecture) -> list[tuple[str, list[weight_map.Piece]]]:
    """The HF linears (module paths, without `.weight`) that `site`'s weight fuses, each with its row pieces,
    in the order they first appear in the fused weight."""
    key, index = site.weight()
    out: dict[str, list[weight_map.Piece]] = {}
    for piece in weight_map.pieces(key, index, arch):
        out.setdefault(piece.name.removesuffix(".weight"), []).append(piece)
    return list(out.items())


def split(site: Site, pair: Pair, arch: Architecture) -> dict[str, Pair]:
    """One megatron adapter as its HF adapters: the same A for each, B's rows regrouped per HF linear (a
    module's pieces come in its own row order)."""
    a, b = pair
    parts: dict[str, list[torch.Tensor]] = {}
    row = 0
    for piece in weight_map.pieces(*site.weight(), arch):
        parts.setdefault(piece.name.removesuffix(".weight"), []).append(b[row:row + piece.rows])
        row += piece.rows
    return {module: (a, torch.cat(rows)) for module, rows in parts.items()}


def fuse(site: Site, adapters: dict[str, Pair], arch: Architecture) -> Pair:
    """The HF adapters of `site`'s linears as one megatron adapter, exactly: at rank r when they all share A,
    else stacked (A's concatenated in the fused order, B block-diagonal: each HF linear's rows read only its
    own A's block), rank k·r."""
    modules = [m for m, _ in hf_modules(site, arch)]
    a_parts = [adapters[m][0] for m in modules]
    shared = all(torch.equal(a_parts[0], a) for a in a_parts[1:])
    rank = a_parts[0].shape[0]
    rows = []
    for piece in weight_map.pieces(*site.weight(), arch):
        module = piece.name.removesuffix(".weight")
        block = adapters[module][1][piece.start:piece.start + piece.rows]
        if not shared:
            j = modules.index(module)
            block = torch.cat([block.new_zeros(block.shape[0], j * rank), block,
                               block.new_zeros(block.shape[0], (len(modules) - j - 1) * rank)], dim=1)
        rows.append(block)
    return (a_parts[0] if shared else torch.cat(a_parts)), torch.cat(rows)


def to_peft(adapters: dict[Site, Pair], arch: Architecture) -> dict[str, torch.Tensor]:
    """PEFT's tensors (`adapter_model.safetensors`'s keys) for megatron adapters, sorted by key."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, Pair]] = {}
    for site, pair in adapters.items():
        if site.expert >= 0:
            experts.setdefault((site.layer, site.target), {})[site.expert] = pair
            continue
        for module, (a, b) in split(site, pair, arch).items():
            out[f"{PREFIX}{module}.lora_A.weight"] = a
            out[f"{PREFIX}{module}.lora_B.weight"] = b
    for (layer, target), pairs in experts.items():
        prefix = _expert_prefixes(layer, [t for (lay, t) in experts if lay == layer])[target]
        a, b = _stack(pairs, arch.num_experts)
        out[f"{PREFIX}{prefix}lora_A.weight"], out[f"{PREFIX}{prefix}lora_B.weight"] = a, b
    return dict(sorted(out.items()))


def from_peft(tensors: dict[str, torch.Tensor], arch: Architecture, lora: Lora, source: str) -> dict[Site, Pair]:
    """Megatron adapters for every site of `lora` from PEFT's tensors, fused exactly (see `fuse`). A site whose
    HF linears lack an adapter, or a tensor no site reads, is a DpocError naming it."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, part = key.removeprefix(PREFIX).rpartition(".lora_")
        by_module.setdefault(module, {})[part] = tensor
    out, used, problems = {}, set(), []
    experts: dict[tuple[int, str], dict[int, Pair]] = {}
    for site in sites(arch, lora):
        if site.expert >= 0:
            modules = [_expert_prefixes(site.layer, _expert_targets(lora, arch))[site.target].removesuffix(".")]
        else:
            modules = [m for m, _ in hf_modules(site, arch)]
        missing = [m for m in modules if set(by_module.get(m, {})) != {"A.weight", "B.weight"}]
        if missing:
            problems.append(Problem(source, WEIGHTS, f"no lora_A/lora_B for {missing[0]} (lora.targets needs "
                                    f"{', '.join(m.rpartition('.')[2] for m in modules)} adapters)"))
            continue
        used.update(modules)
        if site.expert < 0:
            out[site] = fuse(site, {m: (by_module[m]["A.weight"], by_module[m]["B.weight"]) for m in modules}, arch)
            continue
        if (site.layer, site.target) not in experts:
            found = by_module[modules[0]]
            experts[(site.layer, site.target)] = _unstack(found["A.weight"], found["B.weight"], arch.num_experts)
        out[site] = experts[(site.layer, site.target)][site.expert]
    for module in sorted(set(by_module) - used):
        problems.append(Problem(source, WEIGHTS, f"{module} has an adapter that lora.targets does not select "
                                "(loading it would drop it)"))
    if problems:
        raise DpocError(problems)
    return out


# transformers 5 holds a MoE layer's experts as two 3D parameters, which PEFT adapts as target_parameters
EXPERT_PARAMS = {"linear_fc1": "gate_up_proj", "linear_fc2": "down_proj"}


def _expert_targets(lora: Lora, arch: Architecture) -> list[str]:
    return [t for t in EXPERT_PARAMS if t in lora.targets] if lora.experts and arch.num_experts else []


def _expert_prefixes(layer: int, targets: list[str]) -> dict[str, str]:
    """Where PEFT keeps each expert parameter's adapter: it wraps the experts module once per target parameter,
    in target_parameters' order, each wrapper around the last, so the first sits deepest (`base_layer.`)."""
    order = [t for t in EXPERT_PARAMS if t in targets]
    return {t: f"model.layers.{layer}.mlp.experts." + "base_layer." * (len(order) - 1 - i) for i, t in enumerate(order)}


def _stack(pairs: dict[int, Pair], experts: int) -> Pair:
    """Every expert's adapter as PEFT's one per 3D parameter: A `[E·r, in]` (expert e's rows e·r ...), B
    `[out, r·E]` (expert e's columns e, E + e, ...: PEFT reads it as `[out, r, E]`)."""
    a = torch.cat([pairs[e][0] for e in range(experts)])
    b = torch.stack([pairs[e][1] for e in range(experts)], dim=-1)
    return a, b.reshape(b.shape[0], -1)


def _unstack(a: torch.Tensor, b: torch.Tensor, experts: int) -> dict[int, Pair]:
    rank = a.shape[0] // experts
    per_expert = b.reshape(b.shape[0], rank, experts)
    return {e: (a[e * rank:(e + 1) * rank], per_expert[:, :, e].contiguous()) for e in range(experts)}


def merged(name: str, weight: torch.Tensor, hf_adapters: dict[str, Pair], scaling: float) -> torch.Tensor:
    """HF weight `name` with its adapter folded in, W + (B @ A) · scaling, as PEFT's merge computes it on the
    CPU: a 16-bit adapter's product in fp32, cast back before the add."""
    pair = hf_adapters.get(name.removesuffix(".weight"))
    if pair is None:
        return weight
    a, b = pair
    low = a.dtype in (torch.float16, torch.bfloat16)
    delta = (b.float() @ a.float() if low else b @ a) * scaling
    return weight + delta.to(a.dtype).to(weight.dtype)


def hf_adapters(adapters: dict[Site, Pair], arch: Architecture) -> dict[str, Pair]:
    """Every HF linear's adapter (module path -> (A, B)), what `merged` reads."""
    return {module: pair for site, p in adapters.items() for module, pair in split(site, p, arch).items()}


# ---------------------------------------------------------------------------------------------- the directory


def adapter_config(lora: Lora, arch: Architecture, base: str | None) -> dict:
    """adapter_config.json: what PEFT needs to rebuild the adapters on `base` (routed experts' adapters as
    target_parameters: transformers 5 has no per-expert modules)."""
    experts = _expert_targets(lora, arch)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
              "lora_dropout": lora.dropout, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "use_dora": False, "init_lora_weights": True, "base_model_name_or_path": base, "inference_mode": True,
              "target_modules": sorted(hf for t in lora.targets if t not in experts for hf in MCORE_TO_HF[t])}
    if experts:
        config["target_parameters"] = [f"mlp.experts.{EXPERT_PARAMS[t]}" for t in experts]
    return config


def write(out: str | Path, adapters: dict[Site, Pair], arch: Architecture, lora: Lora, base: str | None) -> None:
    """A PEFT adapter directory, published whole (an existing OUT is refused)."""
    tensors = to_peft(adapters, arch)
    with published_dir(out) as staging:
        stream = StreamingSafetensors(staging / WEIGHTS, [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()])
        for key, tensor in tensors.items():
            stream.write(key, tensor)
        stream.close()
        (staging / CONFIG).write_text(json.dumps(adapter_config(lora, arch, base), indent=2, sort_keys=True) + "\n")


def read(path: str | Path, field: str = "lora.init_from") -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter directory's config and tensors; what dpoc cannot load exactly is a DpocError naming it."""
    from safetensors.torch import load_file

    config_file, weights_file = Path(path) / CONFIG, Path(path) / WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise DpocError([Problem(str(path), field, f"not a PEFT adapter directory (valid: a directory with {CONFIG} "
                                 f"and {WEIGHTS})")])
    config = json.loads(config_file.read_text())
    problems = [Problem(str(config_file), key, f"{config.get(key)!r} is not supported (valid: {want!r})")
                for key, want in _EXACT.items() if config.get(key, want) != want]
    unknown = sorted({t for t in config.get("target_modules") or [] if t not in HF_TO_MCORE})
    if unknown:
        problems.append(Problem(str(config_file), "target_modules", f"{unknown[0]!r} is not a linear dpoc adapts "
                                f"(valid: {', '.join(HF_TO_MCORE)})"))
    if problems:
        raise DpocError(problems)
    return config, load_file(str(weights_file))


# the adapter_config.json settings under which an adapter is plain LoRA, ΔW = (lora_alpha / r) · B · A
_EXACT = {"peft_type": "LORA", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none",
          "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False}


def load(path: str | Path, arch: Architecture, lora: Lora) -> dict[Site, Pair]:
    """`lora.init_from`: the adapter directory as megatron adapters at `lora`'s rank and scaling, exactly.

    An adapter whose fused HF linears have different A stacks to a larger rank (`fuse`); dpoc's adapters
    have one rank, so it loads only where every site comes out at `lora.rank` with the same scaling, and is
    otherwise refused with the rank it would need."""
    config, tensors = read(path)
    source = str(Path(path) / CONFIG)
    scaling = config["lora_alpha"] / config["r"]
    if scaling != lora.scaling:
        raise DpocError([Problem(source, "lora_alpha / r", f"{config['lora_alpha']}/{config['r']} = {scaling:g}, but "
                                 f"lora.alpha / lora.rank is {lora.alpha:g}/{lora.rank} = {lora.scaling:g} (valid: "
                                 "the adapter's scaling, so that its update is kept exactly)")])
    adapters = from_peft(tensors, arch, lora, str(path))
    for site, (a, _) in adapters.items():
        if a.shape[0] != lora.rank:
            names = ", ".join(m.rpartition(".")[2] for m, _ in hf_modules(site, arch))
            why = (f"its {names} adapters have different lora_A, which megatron-core's fused {site.target} holds "
                   f"exactly only stacked at rank {a.shape[0]} (block-diagonal B)" if a.shape[0] != config["r"]
                   else f"its rank is {a.shape[0]}")
            raise DpocError([Problem(str(path), f"layer {site.layer} {site.target}", f"{why}, but lora.rank is "
                                     f"{lora.rank} and dpoc's adapters have one rank (valid: lora.rank "
                                     f"{a.shape[0]} with lora.alpha {a.shape[0] * scaling:g}, when every "
                                     "adapter comes out at that rank; or an adapter whose fused linears share "
                                     "lora_A, as dpoc exports them)")])
    return adapters
