"""Resolve: a validated recipe → the frozen `Plan`. Pure: no I/O, no torch, no clock.

Every value is taken through `_Values.take`, which records where it came from (the recipe, a preset, a
default, or a derivation rule) so that `dpoc explain` can show it. Semantic rules run on the result.
"""

from __future__ import annotations

import dataclasses
from pathlib import PurePosixPath
from typing import Any

from dpoc import __version__
from dpoc.compiler.load import HF_CONFIG_SOURCE, LoadedRecipe
from dpoc.compiler.render import targets
from dpoc.compiler.resolve import autolayout, dpo_loss, lora, rules, stale_paths
from dpoc.compiler.resolve.autolayout import LayoutInputs
from dpoc.compiler.resolve.cluster import is_loopback
from dpoc.contract import losses
from dpoc.contract.architecture import MoESpec
from dpoc.contract.dotted import flatten
from dpoc.contract.errors import DpocError, Problem
from dpoc.contract.family import CONVERTER, DEFAULT_TEMPLATE
from dpoc.contract.kernels import experts_why
from dpoc.contract.plan import (
    DPO,
    Checkpoint,
    Cluster,
    Data,
    HardwareSpec,
    Launch,
    Layout,
    ModelSpec,
    Plan,
    Source,
    Training,
)
from dpoc.contract.specs import hardware_spec, model_spec
from dpoc.planner.layout import DEFAULT_WHY, DERIVED_WHY, layout_tag
from dpoc.planner.lengths import Lengths, MeanLength, parse_stats

_MISSING = object()

LAYOUT_KNOBS = tuple(DEFAULT_WHY)
DEFAULT_MASTER_PORT = 6005


class _Values:
    """Reads recipe values by dotted path and records their provenance."""

    def __init__(self, loaded: LoadedRecipe):
        self.file, self.data, self.sources = loaded.path, loaded.data, loaded.sources
        self.length_stats = loaded.length_stats
        self.provenance: dict[str, Source] = {}
        self.problems: list[Problem] = []

    def problem(self, field: str, message: str) -> None:
        """A problem found while resolving; all of them are raised together with the rules' findings."""
        self.problems.append(Problem(self.file, field, message))

    def has(self, path: str) -> bool:
        return self._lookup(path) is not _MISSING

    def take(self, path: str, default: Any = _MISSING, *, rule: str = "", why: str = "", record: str = "") -> Any:
        """The recipe's value at `path`, else `default` (from `rule` when given); provenance under `record`."""
        value = self._lookup(path)
        key = record or path
        if isinstance(value, dict) and value:  # a mapping (hardware.env, model.moe): each entry has its own source
            for leaf in flatten(value):
                self._given(f"{path}.{leaf}", f"{key}.{leaf}")
            return value
        if value is not _MISSING:
            self._given(path, key)
            return value
        self.provenance[key] = Source(f"derived:{rule}" if rule else "default", why)
        return default

    def _given(self, path: str, key: str) -> None:
        src = self.sources.get(path, "user")
        self.provenance[key] = Source(src, self._why(src))

    def _why(self, source: str) -> str:
        if source.startswith("user"):
            return "from the recipe"
        if source == HF_CONFIG_SOURCE:
            return f"from {self.data['model']['hf_weights']}/config.json"
        return "from the preset"

    def derived(self, path: str, value: Any, rule: str, why: str) -> Any:
        self.provenance[path] = Source(f"derived:{rule}", why)
        return value

    def _lookup(self, path: str) -> Any:
        node: Any = self.data
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return _MISSING
            node = node[part]
        return node


def layout_inputs(loaded: LoadedRecipe) -> LayoutInputs:
    """What the layout choice depends on (for `dpoc plan`, which shows the search rather than one Plan): no
    host list, so a what-if question about any size needs no addresses."""
    v = _Values(loaded)
    inputs = _inputs(v)
    if v.problems:
        raise DpocError(v.problems)
    return inputs


def _inputs(v: _Values) -> LayoutInputs:
    model = _model(v)
    hardware = _hardware(v)
    training = _training(v, hardware)
    dpo = dpo_loss.dpo_settings(v)
    if dpo.reference == "live" and dpo.reference_micro_batch_size is not None:
        v.problem("dpo.reference_micro_batch_size", f"{dpo.reference_micro_batch_size}: sizes the precompute pass, "
                  "which a live reference does not run (valid: leave it out, or dpo.reference: precomputed)")
    runtime = v.take("runtime", "dpoc", why="dpoc's own megatron-core runtime")
    pinned = {k: v.take(f"parallelism.{k}", record=f"layout.{k}") for k in LAYOUT_KNOBS if v.has(f"parallelism.{k}")}
    gbs = v.take("training.global_batch_size", record="layout.global_batch_size")
    adapters = lora.lora_settings(v, model)
    return LayoutInputs(model, hardware, training, dpo, runtime, gbs, pinned, _lengths(v, training), adapters,
                        own_reference=v.has("checkpoint.ref_model"))


def _lengths(v: _Values, training: Training) -> Lengths:
    """The sequence lengths the planner models: a preprocessing stats file's histograms, else one mean."""
    if v.has("training.length_stats"):
        path = v.take("training.length_stats", record="estimate.lengths")
        v.provenance["estimate.lengths"] = Source(v.sources.get("training.length_stats", "user"),
                                                  f"the length histograms of {path}")
        if v.has("training.mean_seq_length"):
            v.problem("training.mean_seq_length", "given with training.length_stats, which says more (valid: one of "
                      "the two; length_stats is the dataset's own histogram)")
        try:
            return parse_stats(v.length_stats, path)
        except DpocError as exc:
            v.problems.extend(exc.problems)
            return MeanLength(training.seq_length)
    return MeanLength(v.take(
        "training.mean_seq_length",
        training.seq_length,
        rule="training.seq_length",
        why="pair lengths unknown (no training.length_stats): plan as if every micro-batch were full length",
        record="estimate.lengths",
    ))


def resolve(loaded: LoadedRecipe, build_name: str) -> Plan:
    """The Plan of `loaded` built into a directory called `build_name` (which names the build)."""
    v = _Values(loaded)
    inputs = _inputs(v)
    cluster = _cluster(v, inputs.hardware.nodes)
    model, hardware, training, dpo, runtime = inputs.model, inputs.hardware, inputs.training, inputs.dpo, inputs.runtime
    layout, estimate, layout_warnings = _layout(v, inputs)
    if "reference_pass" in estimate and dpo.reference_micro_batch_size is None:
        dpo = dataclasses.replace(dpo, reference_micro_batch_size=estimate["reference_pass"]["micro_batch_size"])
    training = _with_save_interval(v, training, layout, estimate)

    name = _name(v, build_name)
    v.derived("warnings", None, "rules", "what the rules and the planner flag as slow or risky; it still runs")
    run_dir = v.take("run_dir", f"runs/{name}", rule="name",
                     why="runs/<name>: each build its own metrics, logs and checkpoints")
    plan = Plan(
        name=name,
        dpoc_version=v.derived("dpoc_version", __version__, "dpoc", "the dpoc release that resolved this plan"),
        runtime=runtime,
        model=model,
        hardware=hardware,
        layout=layout,
        training=training,
        dpo=dpo,
        data=_data(v, model, run_dir, dpo),
        checkpoint=_checkpoint(v, loaded.name, layout, run_dir, runtime, dpo.reference == "none"),
        lora=inputs.lora,
        cluster=cluster,
        launch=Launch(max_restarts=v.take("launch.max_restarts", 0, why="a failed node fails the job: no restarts")),
        run_dir=run_dir,
        estimate=estimate,
        provenance=tuple(sorted(v.provenance.items())),
    )
    violations = layout_warnings + rules.check(rules.Context(model, hardware, layout, training, dpo))
    violations += targets.get(runtime).unsupported(plan)
    violations += stale_paths.check(plan)
    errors = v.problems + [Problem(loaded.path, x.field, x.message) for x in violations if not x.warning]
    if errors:
        raise DpocError(list(dict.fromkeys(errors)))
    return dataclasses.replace(plan, warnings=tuple(f"{x.field}: {x.message}" for x in violations if x.warning))


def _name(v: _Values, build_name: str) -> str:
    """The recipe's `name` when it sets one, else the build directory's: two builds of one recipe never share a
    run directory or a dataset."""
    if v.has("name"):
        return v.take("name")
    return v.derived("name", build_name, "build", "the build directory's name (build/<recipe file stem> unless -o): "
                     "each build its own run directory and dataset")


def _layout(v: _Values, inputs: LayoutInputs) -> tuple[Layout, dict[str, Any], list[rules.Violation]]:
    """The pinned knobs, the planner's choice for the open ones, defaults for the rest; the estimate; and the
    memory warnings of a pinned layout."""
    from dpoc.planner import report

    pinned = inputs.pinned
    try:
        choice = autolayout.choose(inputs)
    except autolayout.LayoutError as exc:
        raise DpocError(v.problems + [Problem(v.file, x.field, x.message) for x in exc.violations]) from None
    layout = choice.layout
    if choice.result is not None:
        r, t = choice.result, choice.throughput
        why = (
            f"the planner's best of {len(r.ranked)} valid layouts that fit ({r.evaluated} tried): "
            f"{t.samples_per_s:.3g} pairs/s predicted"
        )
    for knob in LAYOUT_KNOBS:
        if knob in choice.chosen:
            v.derived(f"layout.{knob}", getattr(layout, knob), "planner", why)
        elif knob not in pinned:
            v.derived(f"layout.{knob}", getattr(layout, knob), f"layout.{knob}", DEFAULT_WHY[knob])
    for name, text in DERIVED_WHY.items():
        v.derived(f"layout.{name}", getattr(layout, name), f"layout.{name}", text)
    v.derived("layout.moe_experts", layout.moe_experts, "layout.moe_experts",
              experts_why(layout.moe_grouped_gemm, inputs.hardware.device, layout.moe_experts))
    v.derived("estimate.efficiency", None, "planner.calibration",
              "fraction of peak FLOPs reached, fitted on published non-DPO runs (bench/planner.py)")
    reference = inputs.dpo.reference
    v.derived("estimate.memory", None, "planner.memory", "per-device memory model of this layout: weights, "
              f"gradients, optimizer, the {reference} reference, activations at the estimate's lengths, buffers, "
              "reserve")
    v.derived("estimate.throughput", None, "planner.throughput", "predicted from this layout, the fitted "
              f"efficiency, the estimate's lengths and the {reference} reference; samples are preference pairs "
              "(pairs/s)")
    v.derived("estimate.reference", None, "dpo.reference", "the reference mode the estimate models")
    v.derived("estimate.target", None, "runtime", "how the target batches (sort-and-cut: each micro-batch padded "
              "to its own longest pair; global-batch: every micro-batch to its global batch's longest) and the "
              "memory features it turns on, as the planner models them")
    v.derived("estimate.padding", None, "planner.lengths", "dynamic padding, as the target batches: the slowest "
              "data-parallel rank's expected padded tokens per sequence, and the longest micro-batch's (what memory "
              "is planned for)")
    estimate = {
        "lengths": inputs.lengths.summary(),
        "reference": reference,
        "efficiency": {"dense": autolayout.FITTED.dense, "experts": autolayout.FITTED.experts},
        "target": report.traits_summary(inputs.traits),
        "memory": report.memory_summary(choice.memory),
        "throughput": report.throughput_summary(choice.throughput),
    }
    if inputs.training.packing:
        estimate["packing"] = report.packing_summary(layout, inputs.training, inputs.lengths)
    elif inputs.training.dynamic_padding:
        estimate["padding"] = report.padding_summary(layout, inputs.training, inputs.lengths, inputs.traits.batching)
    if choice.full_parameter is not None:
        v.derived("estimate.full_parameter", None, "planner.memory", "LoRA's alternative: this layout training "
                  "every parameter (its gradients, optimizer state and reference copy), beside the LoRA estimate")
        estimate["full_parameter"] = report.full_parameter_summary(*choice.full_parameter)
    if choice.reference_pass is not None:
        v.derived("estimate.reference_pass", None, "planner.throughput", "the precompute pass of precomputed "
                  "reference log-probs (reference.sh): one forward over the dataset, sorted by length")
        estimate["reference_pass"] = report.reference_pass_summary(choice.reference_pass.estimate,
                                                                   choice.reference_pass.memory)
    return layout, estimate, list(choice.warnings)


def _model(v: _Values) -> ModelSpec:
    m = v.data["model"]
    for key in m:
        v.take(f"model.{key}")
    if isinstance(m.get("moe"), dict):
        for field in dataclasses.fields(MoESpec):
            v.take(f"model.moe.{field.name}", why="the model schema's default")
    else:
        v.take("model.moe", why="no experts: a dense model")
    if "preset" in m:
        name = m["preset"]
    else:  # an inline architecture, or the one config.json gave
        from_weights = v.sources.get("model.family") == HF_CONFIG_SOURCE
        name = PurePosixPath(m["hf_weights"]).name if from_weights else "inline"
    v.derived("model.name", name, "model.preset", "the preset's name, the weights directory's when config.json "
              "gave the architecture, or inline when the recipe defines it")
    v.derived(
        "model.converter",
        CONVERTER[m["family"]],
        "model.family",
        "MindSpeed-LLM's convert_ckpt_v2.py knows qwen3/qwen3-moe; Qwen2.5 and Llama-3 need the legacy convert_ckpt.py",
    )
    return model_spec(name, m)


def _hardware(v: _Values) -> HardwareSpec:
    """The node type and how many nodes; planning needs no more (the host list is `_cluster`'s)."""
    h = v.data["hardware"]
    for key in h:
        v.take(f"hardware.{key}")
    hosts = h.get("hosts")
    nodes = h["nodes"]
    if hosts and not v.sources.get("hardware.nodes", "").startswith("user"):
        nodes = v.derived("hardware.nodes", len(hosts), "hardware.hosts", "one node per host")
    v.derived("hardware.name", h["preset"], "hardware.preset", "the hardware preset's name")
    return hardware_spec(h["preset"], h, nodes)


def _cluster(v: _Values, nodes: int) -> Cluster:
    """Where the nodes are: one address per node, node 0 first, and the rendezvous address."""
    hosts = v.data["hardware"].get("hosts")
    if hosts and len(hosts) != nodes:
        v.problem("hardware.hosts", f"lists {len(hosts)} hosts but hardware.nodes is {nodes}; valid: one host per node")
    if hosts:
        host_list, why = tuple(hosts), "the recipe's hosts, node 0 first"
    elif nodes == 1:
        host_list, why = ("127.0.0.1",), "one node: this machine"
    else:
        host_list, why = (), "none: the launcher places the nodes (dpoc launch --ray) and supplies the master"
    v.derived("cluster.hosts", host_list, "hardware.hosts", why)
    master = v.take(
        "hardware.master_addr",
        host_list[0] if host_list else None,
        rule="hardware.hosts",
        why="node 0's address" if host_list else "no hosts: the launcher supplies DPOC_MASTER_ADDR",
        record="cluster.master_addr",
    )
    port = v.take(
        "hardware.master_port",
        DEFAULT_MASTER_PORT if master is not None else None,
        why="MindSpeed-RL's default master port" if master is not None
        else "no hosts: the launcher supplies DPOC_MASTER_PORT (a free port on node 0)",
        record="cluster.master_port",
    )
    remote = [x for x in host_list if not is_loopback(x)]
    if master is not None and is_loopback(master) and remote:
        field = "hardware.master_addr" if v.has("hardware.master_addr") else "hardware.hosts"
        v.problem(field, f"the master {master} is a loopback address, but {remote[0]} reads it as itself, so no "
                  "other node would reach node 0; valid: node 0's network address (first in hardware.hosts), or no "
                  "hosts and dpoc launch --ray")
    return Cluster(hosts=host_list, master_addr=master, master_port=port)


def _training(v: _Values, hardware: HardwareSpec) -> Training:
    iters = v.take("training.train_iters")
    precision = v.take(
        "training.precision",
        "fp32" if hardware.device == "cpu" else "bf16",
        rule="hardware.device",
        why="bf16 on accelerators; fp32 on cpu, where bf16 matmuls are slow",
    )
    return Training(
        seq_length=v.take("training.seq_length"),
        train_iters=iters,
        lr=float(v.take("training.lr")),
        min_lr=float(v.take("training.min_lr", 0.0, why="no decay floor")),
        lr_decay_style=v.take("training.lr_decay_style", "constant", why="DPO fine-tuning default"),
        warmup_iters=v.take("training.warmup_iters", 0, why="no warm-up"),
        weight_decay=float(v.take("training.weight_decay", 0.0, why="DPO fine-tuning default")),
        clip_grad=float(v.take("training.clip_grad", 1.0, why="Megatron's default")),
        adam_beta1=float(v.take("training.adam_beta1", 0.9, why="Adam default")),
        adam_beta2=float(v.take("training.adam_beta2", 0.999, why="Adam default")),
        adam_eps=float(v.take("training.adam_eps", 1e-8, why="Adam default")),
        seed=v.take("training.seed", 1234, why="Megatron's default seed"),
        precision=precision,
        dynamic_padding=v.take(
            "training.dynamic_padding", True, why="pad to the micro-batch's longest pair: no FLOPs on padding"
        ),
        save_interval=v.take("training.save_interval", iters, rule="planner", why="from the predicted step time"),
        log_interval=v.take("training.log_interval", 1, why="log every step"),
        packing=v.take("training.packing", False, why="one row per sequence, padded, as MindSpeed batches pairs"),
    )


LOST_WORK_S = 30 * 60  # the default save interval bounds the work a crash loses to about this


def save_interval(step_s: float, train_iters: int, budget_s: float = LOST_WORK_S) -> int:
    """Steps between checkpoints so that a crash loses at most `budget_s` of work, within [1, train_iters]."""
    return max(1, min(train_iters, int(budget_s // step_s)))


def _with_save_interval(v: _Values, training: Training, layout: Layout, estimate: dict[str, Any]) -> Training:
    """The default checkpoint interval from the planner's predicted step time (global batch / pairs per s)."""
    if v.has("training.save_interval"):
        return training
    pairs_per_s = estimate["throughput"]["samples_per_s"]
    step_s = layout.global_batch_size / pairs_per_s
    every = save_interval(step_s, training.train_iters)
    why = (f"a crash loses at most ~{LOST_WORK_S // 60} min of work: predicted {step_s:.3g} s/step (global batch "
           f"{layout.global_batch_size} / {pairs_per_s:g} pairs/s)")
    if every == training.train_iters:
        why += f"; the {training.train_iters} steps take less, so one save after the last step"
    else:
        why += f" -> every {every} steps (~{every * step_s / 60:.0f} min)"
    v.derived("training.save_interval", every, "planner", why)
    return dataclasses.replace(training, save_interval=every)


def _data(v: _Values, model: ModelSpec, run_dir: str, dpo: DPO) -> Data:
    path = v.take("dataset.path", record="data.input")
    layout = v.take(
        "dataset.layout", record="data.layout", default="auto",
        why="detected from the data's first rows when preprocessing (never from the file's name)",
    )
    if layout == "unpaired" and not losses.unpaired(dpo.loss):
        v.problem("dataset.layout", f"unpaired: unpaired completions train only with kto, not {', '.join(dpo.loss)} "
                  "(valid: dpo.loss: kto, or paired data)")
    map_keys = v.take(
        "dataset.map_keys",
        record="data.map_keys",
        default={},
        why="MindSpeed-RL's default columns; with layout auto, the prompt and system columns are detected too"
        if layout == "auto"
        else "MindSpeed-RL's default columns",
    )
    if not v.has("model.tokenizer") and not v.has("model.hf_weights"):
        v.problem("model.tokenizer", "is required when model.hf_weights is not given")
    tokenizer = v.take(
        "model.tokenizer",
        v.data["model"].get("hf_weights"),
        rule="model.hf_weights",
        record="data.tokenizer",
        why="the tokenizer that ships with the weights",
    )
    return Data(
        input=path,
        format=v.take("dataset.format", record="data.format", default="auto", why="from the file extension"),
        layout=layout,
        tokenizer=tokenizer,
        template=v.take(
            "dataset.template",
            record="data.template",
            default=DEFAULT_TEMPLATE[model.family],
            rule="model.family",
            why=f"the chat template of the {model.family} family",
        ),
        enable_thinking=v.take(
            "dataset.enable_thinking", record="data.enable_thinking", default=False, why="no empty think block"
        ),
        map_keys=tuple(sorted(map_keys.items())),
        truncate=v.take(
            "dataset.truncate",
            record="data.truncate",
            default=None,
            why="pairs too long are dropped, as MindSpeed-RL does",
        ),
        output_prefix=v.take(
            "dataset.output_prefix",
            record="data.output_prefix",
            default=f"{run_dir}/dataset/{PurePosixPath(path).stem}",
            rule="run_dir",
            why="<run_dir>/dataset/<input file stem>: each build its own, so builds with other data settings never "
            "overwrite it",
        ),
        workers=v.take("dataset.workers", record="data.workers", default=4, why="four tokenizer processes"),
    )


def _checkpoint(v: _Values, name: str, layout, run_dir: str, runtime: str, reference_free: bool) -> Checkpoint:
    hf_weights = v.take("model.hf_weights", None, why="not given", record="checkpoint.hf_weights")
    init, load, ref = _dpoc_weights(v, name, hf_weights)
    mindspeed_load, mindspeed_ref = _mindspeed_weights(v, name, layout, hf_weights, init, runtime)
    if reference_free:  # a reference given anyway is refused by dpo_loss
        ref = v.derived("checkpoint.ref_model", None, "dpo.loss", "a reference-free loss loads no reference")
        mindspeed_ref = v.derived("checkpoint.mindspeed_ref_model", None, "dpo.loss", "a reference-free loss")
    if load is not None and load == mindspeed_load:
        field = "checkpoint.mindspeed_load" if v.has("checkpoint.mindspeed_load") else "checkpoint.load"
        v.problem(field, f"{load}: is both checkpoint.load (dpoc's distributed checkpoint) and "
                  "checkpoint.mindspeed_load (MindSpeed-LLM's per-rank checkpoint): each target's converter would "
                  f"overwrite the other's (valid: two folders, e.g. ./model_weights/{name}-mcore and "
                  f"./model_weights/{name}-{layout_tag(layout)})")
    return Checkpoint(
        init=init,
        hf_weights=hf_weights,
        load=load,
        ref_model=ref,
        mindspeed_load=mindspeed_load,
        mindspeed_ref_model=mindspeed_ref,
        save=v.take("checkpoint.save", f"{run_dir}/checkpoints", rule="run_dir", why="<run_dir>/checkpoints"),
        save_optimizer=v.derived(
            "checkpoint.save_optimizer",
            True,
            "resume",
            "every save holds optimizer and RNG state, so every run can resume",
        ),
        keep=v.take("checkpoint.keep", 2, why="the newest checkpoint, and the one before it in case it is damaged"),
    )


def _dpoc_weights(v: _Values, name: str, hf_weights: str | None) -> tuple[str, str | None, str | None]:
    """The dpoc runtime's start: (init, load, ref_model). Its converted weights are a megatron-core distributed
    checkpoint, a format of its own: MindSpeed-RL's per-rank weights live under checkpoint.mindspeed_load."""
    if hf_weights is not None and not v.has("checkpoint.load"):
        init = v.take("checkpoint.init", "hf", rule="model.hf_weights",
                      why="no checkpoint.load: the dpoc runtime reads the Hugging Face weights straight into the "
                      "sharded model")
    else:
        init = v.take("checkpoint.init", "converted", rule="checkpoint.load",
                      why="the policy starts from the converted weights checkpoint.load")
    if init == "random":
        _refuse_with_random_init(v, ("checkpoint.load", "checkpoint.ref_model"))
        v.derived("checkpoint.load", None, "checkpoint.init", "random init: nothing to load")
        v.derived("checkpoint.ref_model", None, "checkpoint.init",
                  "random init: the reference starts from the policy's seeded init")
        return init, None, None
    if init == "hf":
        if hf_weights is None:
            v.problem("model.hf_weights", "is required for checkpoint.init hf (valid: a Hugging Face weights "
                      "directory, or checkpoint.init converted with checkpoint.load)")
        if v.has("checkpoint.load"):
            v.problem("checkpoint.load", "checkpoint.init is hf: the policy starts from model.hf_weights "
                      "(valid: leave it out, or checkpoint.init converted)")
        v.derived("checkpoint.load", None, "checkpoint.init", "init hf: the policy reads model.hf_weights")
        return init, None, v.take("checkpoint.ref_model", hf_weights, rule="model.hf_weights", why=_INITIAL)
    if hf_weights is None:  # nothing to convert: the dpoc target refuses the Plan unless checkpoint.load is given
        load = v.take("checkpoint.load", None, rule="model.hf_weights", why="no Hugging Face weights to convert")
    else:
        load = v.take("checkpoint.load", f"./model_weights/{name}-mcore", rule="model.hf_weights",
                      why="dpoc convert hf-to-mcore's output (convert/hf_to_mcore.sh): one distributed checkpoint "
                      "for every layout, in a folder of its own (MindSpeed-RL's per-rank weights are another format)")
    return init, load, v.take("checkpoint.ref_model", load, rule="checkpoint.load", why=_INITIAL)


def _mindspeed_weights(v: _Values, name: str, layout, hf_weights: str | None, init: str,
                       runtime: str) -> tuple[str | None, str | None]:
    """MindSpeed-RL's start: (mindspeed_load, mindspeed_ref_model), MindSpeed-LLM's per-rank checkpoint for exactly
    this layout, which mindspeed-rl/convert/hf_to_mcore.sh writes. None when there is nothing to load (the
    MindSpeed-RL target then says why it is left out)."""
    keys = ("checkpoint.mindspeed_load", "checkpoint.mindspeed_ref_model")
    if init == "random":
        _refuse_with_random_init(v, keys)
        for key in keys:
            v.derived(key, None, "checkpoint.init", "random init: MindSpeed-RL has no weights to load")
        return None, None
    if runtime == "mindspeed-rl":  # recipes from before the per-target keys: their checkpoint.load was per rank
        for dpoc_key, key in zip(("checkpoint.load", "checkpoint.ref_model"), keys, strict=True):
            if v.has(dpoc_key) and not v.has(key):
                v.problem(dpoc_key, f"names the dpoc runtime's weights; runtime mindspeed-rl loads MindSpeed-LLM's "
                          f"per-rank ones from {key} (valid: rename it {key}, or runtime=dpoc)")
    if hf_weights is None:
        load = v.take(keys[0], None, rule="model.hf_weights", why="no Hugging Face weights to convert")
    else:
        load = v.take(keys[0], f"./model_weights/{name}-{layout_tag(layout)}", rule="layout",
                      why="mindspeed-rl/convert/hf_to_mcore.sh's output: MindSpeed-LLM's per-rank checkpoint for "
                      "exactly this layout, in a folder of its own (dpoc's distributed checkpoint is another format)")
    return load, v.take(keys[1], load, rule="checkpoint.mindspeed_load", why=_INITIAL)


_INITIAL = "the policy's initial weights (the reference never follows the trained policy)"


def _refuse_with_random_init(v: _Values, keys: tuple[str, ...]) -> None:
    for key in keys:
        if v.has(key):
            v.problem(key, "checkpoint.init is random: policy and reference start from the same seeded init "
                      "(valid: leave it out, or checkpoint.init hf/converted)")
