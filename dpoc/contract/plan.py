"""The Plan: the one frozen intermediate representation between `resolve` and `render`/`run`.

Every value a run needs lives here, typed; `provenance` says for each dotted path where the value came
from (`user`, `preset:<name>`, `derived:<rule>`) and why. `plan.json` is `Plan.to_json()`, and the Plan
hash (the build's identity) is the sha256 of exactly those bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from dpoc.contract.architecture import Architecture
from dpoc.contract.dotted import flatten
from dpoc.contract.lora import Lora


@dataclass(frozen=True)
class ModelSpec(Architecture):
    """The architecture and the names each tool knows the model by."""

    name: str
    family: str  # qwen3 | qwen3_moe | qwen2 | llama
    mindspeed_name: str  # model key in MindSpeed-RL's configs/model/<name>.yaml
    converter: str  # MindSpeed-LLM converter: "v2" (convert_ckpt_v2.py) or "legacy" (convert_ckpt.py)
    hf_model_type: str  # --model-type-hf for that converter


@dataclass(frozen=True)
class HardwareSpec:
    """One hardware preset as the recipe overrides it: devices, memory, links and the fitted cost constants."""
    name: str
    device: str  # npu | cuda | cpu
    backend: str  # hccl | nccl | gloo
    devices_per_node: int
    nodes: int
    memory_gib: float
    reserved_gib: float  # runtime, driver and communication-library reserve per device
    peak_tflops: float  # dense bf16 per device (fp32 on cpu)
    intra_node_gbps: float  # per device, one direction, GB/s
    inter_node_gbps: float
    superpod_nodes: int  # nodes on one high-bandwidth fabric (0: none beyond the node)
    superpod_gbps: float
    hccl_buffsize_mb: int
    env: tuple[tuple[str, str], ...]
    op_latency_us: float  # fixed cost of one call of a forward or backward pass, whatever its FLOPs
    optimizer_tensor_us: float  # the optimizer step's fixed cost per parameter tensor it updates
    memory_gbps: float  # memory bandwidth a streaming sweep achieves (the optimizer step), GB/s
    collective_latency_us: float  # fixed cost of one collective or point-to-point call, whatever its bytes

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node


@dataclass(frozen=True)
class Layout:
    """Parallel layout; `dp`, `edp`, `num_microbatches` and `stage_layers` are derived."""

    world_size: int
    tp: int
    pp: int
    vpp: int  # virtual stages per pipeline rank (1: no interleaving)
    cp: int
    ep: int
    etp: int
    dp: int
    edp: int
    sequence_parallel: bool
    micro_batch_size: int  # pairs
    global_batch_size: int  # pairs
    num_microbatches: int  # per data-parallel rank and step
    recompute: str  # none | selective | full
    recompute_method: str | None  # uniform | block (full recompute)
    recompute_num_layers: int | None
    num_layer_list: tuple[int, ...] | None  # uneven pipeline, as given
    noop_layers: tuple[int, ...]
    stage_layers: tuple[int, ...]  # transformer layers (incl. no-op) per pipeline stage
    distributed_optimizer: bool
    moe_dispatcher: str | None
    moe_grouped_gemm: bool
    moe_experts: str | None  # derived: the experts kernel (contract/kernels.py EXPERTS); None for a dense model
    moe_permutation_async_comm: bool
    moe_alltoall_overlap_comm: bool
    moe_tp_extend_ep: bool
    swap_attention: bool = False  # MindSpeed: attention's saved activations offloaded to host memory
    cp_algo: str = "ring"  # ring | ulysses (MindSpeed's all-to-all over heads)


@dataclass(frozen=True)
class Training:
    """The optimizer, schedule, lengths and precision of the run."""
    seq_length: int
    train_iters: int
    lr: float
    min_lr: float
    lr_decay_style: str
    warmup_iters: int
    weight_decay: float
    clip_grad: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    seed: int
    precision: str  # bf16 | fp16 | fp32
    dynamic_padding: bool  # pad each micro-batch only to its longest sequence (rounded to tp·cp)
    save_interval: int
    log_interval: int
    packing: bool = False  # several pairs per micro-batch in one token stream (dpoc runtime only)


@dataclass(frozen=True)
class DPO:
    """The preference loss (or losses, weighted) and its parameters."""
    loss: tuple[str, ...]  # dpoc.contract.losses names, added with loss_weights
    beta: float
    label_smoothing: float
    sft_weight: float  # RPO's alpha: an sft term of this weight
    # live: the frozen reference runs in every step | precomputed: its log-probs, once | none: a reference-free loss
    reference: str = "live"
    reference_micro_batch_size: int | None = None  # pairs per forward of the precompute pass (precomputed only)
    loss_weights: tuple[float, ...] = ()  # one per loss; empty: 1 each
    ld_alpha: float | None = None  # LD-DPO's weight of the tokens past the shorter response (None: no weighting)
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    cpo_alpha: float = 0.0  # weight of the chosen NLL of cpo and simpo
    kto_desirable_weight: float = 1.0  # kto: TRL's desirable_weight / undesirable_weight
    kto_undesirable_weight: float = 1.0


@dataclass(frozen=True)
class Data:
    """The dataset: the preference file, how to read and template it, and the preprocessed prefix."""
    input: str
    format: str  # auto | jsonl | json | parquet
    layout: str  # auto | pairwise | messages | hh-rlhf | unpaired (kto only)
    tokenizer: str
    template: str
    enable_thinking: bool
    map_keys: tuple[tuple[str, str], ...]
    truncate: str | None
    output_prefix: str
    workers: int


@dataclass(frozen=True)
class Checkpoint:
    """Where the weights come from and where the run saves and resumes."""
    init: str  # hf (hf_weights) | converted (load) | random (policy and reference from the same seeded init)
    hf_weights: str | None  # Hugging Face weights directory (init hf, or the conversion's input)
    load: str | None  # dpoc runtime, init converted: a megatron-core distributed checkpoint (loads at any layout)
    ref_model: str | None  # the dpoc runtime's frozen reference (HF directory or distributed checkpoint)
    mindspeed_load: str | None  # MindSpeed-RL: MindSpeed-LLM's per-rank checkpoint for exactly this layout
    mindspeed_ref_model: str | None  # MindSpeed-RL's frozen reference (a per-rank checkpoint)
    save: str
    save_optimizer: bool  # always true: every save is resumable
    keep: int  # newest complete training checkpoints kept


@dataclass(frozen=True)
class Cluster:
    """The nodes and the rendezvous address the node scripts use."""
    hosts: tuple[str, ...]  # one per node, node 0 first; empty: the launcher places the nodes (Ray)
    master_addr: str | None  # None: the launcher supplies DPOC_MASTER_ADDR
    master_port: int | None  # None: the launcher supplies DPOC_MASTER_PORT


@dataclass(frozen=True)
class Launch:
    """What `dpoc launch` does when the job fails."""
    max_restarts: int  # `dpoc launch` restarts a failed job this many times, resuming from the last checkpoint


@dataclass(frozen=True)
class Source:
    """Where a resolved value came from, and why."""
    source: str  # user | preset:<name> | derived:<rule> | default
    why: str = ""


@dataclass(frozen=True)
class Plan:
    """The resolved, frozen build: every stage after resolve reads only this."""
    name: str
    dpoc_version: str
    runtime: str  # the target the node scripts launch: dpoc | mindspeed-rl
    model: ModelSpec
    hardware: HardwareSpec
    layout: Layout
    training: Training
    dpo: DPO
    data: Data
    checkpoint: Checkpoint
    lora: Lora | None  # the recipe's lora section; None: every parameter trains
    cluster: Cluster
    launch: Launch
    run_dir: str
    estimate: dict[str, Any] | None = None  # the planner's memory breakdown and predicted throughput
    warnings: tuple[str, ...] = ()
    provenance: tuple[tuple[str, Source], ...] = field(default=())

    def source_of(self, path: str) -> Source:
        return source_at(dict(self.provenance), path)

    def to_dict(self) -> dict[str, Any]:
        data = _plain(self)
        data["provenance"] = {path: _plain(src) for path, src in self.provenance}
        return data

    @cached_property
    def _json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    def to_json(self) -> str:
        """Canonical text of plan.json: sorted keys, fixed indentation, trailing newline."""
        return self._json

    def hash(self) -> str:
        return hashlib.sha256(self._json.encode()).hexdigest()


def source_at(provenance: dict[str, Source], path: str) -> Source:
    """Where the value at `path` came from: its own record, else that of the nearest recorded enclosing value
    (`estimate.memory.peak_gib` is part of `estimate.memory`), else a default."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        found = provenance.get(".".join(parts[:end]))
        if found is not None:
            return found
    return Source("default")


def plan_values(data: dict[str, Any]) -> dict[str, Any]:
    """plan.json's values by dotted path, without the provenance: the rows `dpoc explain` prints and
    `dpoc diff` compares."""
    return flatten({k: v for k, v in data.items() if k != "provenance"})


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "provenance"}
    if isinstance(value, tuple):
        if value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value):
            return {k: _plain(v) for k, v in value}
        return [_plain(v) for v in value]
    return value
