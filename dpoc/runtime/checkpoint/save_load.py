"""Training checkpoints of the dpoc runtime: saved every `--save-interval` steps and after the last, resumed exactly.

A checkpoint is a megatron-core distributed checkpoint (torch_dist) in `<save>/iter_NNNNNNN/`, published
atomically by `publish` (a manifest of sizes and sha256, the tracker replaced last). It holds the policy under
`GPTModel.sharded_state_dict()`'s own keys, the optimizer (fully reshardable, `optimizer_state`), the LR
scheduler, every rank's RNG, and `dpoc_checkpoint.json`: iteration, consumed samples, what fixes the data order
(seed, global batch, the dataset's hash), the Plan hash, the layout, versions, the architecture and the
reference's identity. The frozen reference is never saved.

Resuming takes the newest folder whose files match its manifest (warning about each newer one that does not),
checks that it is the same run (architecture, data order, reference) and that a changed layout can reshard,
then loads it. The data order is a pure function of seed, step and dataset, so the loop simply continues at
the saved step. RNG states are restored at the saved layout only: at another one each rank keeps its freshly
seeded generators (as Megatron-LM does) — which changes nothing the runtime draws today (dropout is off;
the data order and the init use their own seeded generators).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import megatron.core
import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async

from dpoc import __version__
from dpoc.common.atomic import write_atomically
from dpoc.contract import losses, megatron_args
from dpoc.contract.errors import DpocError, Problem
from dpoc.contract.runs import PREEMPTED
from dpoc.data.pairwise import dataset_prefix, fields_of
from dpoc.runtime.checkpoint import optimizer_state, publish
from dpoc.runtime.model import lora
from dpoc.runtime.model.device import Device
from dpoc.runtime.model.gpt import virtual_pipeline_size
from dpoc.runtime.step.agree import from_rank0
from dpoc.runtime.step.session import sync_params
from dpoc.runtime.weights.weight_identity import lora_base_identity, reference_identity

RECORDS = "dpoc_checkpoint.json"
FORMAT = 1
# tests only: "<iteration>:<flag file>" holds the save of that iteration after its files are written and
# before anything is published: rank 0 creates the flag file, and every rank waits until it is deleted (a
# test kills the job there, or signals it and lets it go on)
PAUSE_ENV = "DPOC_TEST_PAUSE_SAVE"
_LAYOUT_KNOBS = ("tp", "pp", "vpp", "cp", "ep", "etp")


def layout(args: argparse.Namespace, world: int) -> dict[str, int | bool]:
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    return {"tp": tp, "pp": pp, "vpp": virtual_pipeline_size(args) or 1, "cp": cp,
            "ep": args.expert_model_parallel_size, "etp": args.expert_tensor_parallel_size or tp,
            "dp": world // (tp * pp * cp), "world": world, "distributed_optimizer": args.use_distributed_optimizer}


def layout_text(lay: dict) -> str:
    knobs = " ".join(f"{k}={lay[k]}" for k in (*_LAYOUT_KNOBS, "dp"))
    return f"{knobs} ({'distributed' if lay['distributed_optimizer'] else 'plain'} optimizer)"


def data_order(args: argparse.Namespace, pairs: int) -> dict[str, int | str]:
    """What the data order is a function of, besides the step."""
    digest = hashlib.sha256()
    # the index files hold every document's length and offset: small, and telling
    for field in fields_of(losses.unpaired(args.dpo_loss_type)):
        digest.update(Path(dataset_prefix(args.data_path, field) + ".idx").read_bytes())
    return {"seed": args.seed, "global_batch_size": args.global_batch_size, "pairs": pairs,
            "dataset_sha256": digest.hexdigest()}


def records(args: argparse.Namespace, world: int, data: dict, iteration: int = 0, reason: str = "",
            optimizer_step: int = 0) -> dict:
    """`dpoc_checkpoint.json`: a checkpoint's identity; also what a resuming run compares with its own."""
    return {
        "format": FORMAT, "iteration": iteration, "consumed_samples": iteration * args.global_batch_size,
        "reason": reason, "optimizer_step": optimizer_step, "plan_hash": args.dpoc_plan_hash,
        "layout": layout(args, world), "data": data, "architecture": megatron_args.architecture(args),
        "reference": reference_identity(args), "lora": _lora_record(args),
        "versions": {"dpoc": __version__, "megatron_core": megatron.core.__version__, "torch": torch.__version__},
    }


def _lora_record(args: argparse.Namespace) -> dict | None:
    """A LoRA run's adapters (rank, alpha, dropout, targets, experts) and the frozen base they sit on."""
    settings = lora.settings(args)
    if settings is None:
        return None
    return {"rank": settings.rank, "alpha": settings.alpha, "dropout": settings.dropout,
            "targets": list(settings.targets), "experts": settings.experts, "base": lora_base_identity(args)}


def _lora_problems(saved: dict | None, current: dict | None, args_file: str, folder: str) -> list[Problem]:
    """A LoRA checkpoint holds only adapters: it resumes only LoRA runs with the same adapters on the same base."""
    if saved == current:
        return []
    if saved is None or current is None:
        what = "full-parameter" if saved is None else "LoRA (adapters only)"
        valid = "no --lora-r" if saved is None else f"--lora-r {saved['rank']}"
        return [Problem(args_file, "--lora-r", f"{folder} is a {what} checkpoint; it resumes only a run of the same "
                        f"kind (valid: {valid})")]
    old_base, base = saved["base"], current["base"]
    if old_base["sha256"] != base["sha256"]:
        return [Problem(args_file, "--dpoc-init", f"the LoRA base is {base['source']} (sha256 {base['sha256'][:12]}) "
                        f"but {folder} holds adapters trained on {old_base['source']} ({old_base['sha256'][:12]}); "
                        f"adapters resume only on their own base (valid: {old_base['source']})")]
    changed = [f"{k} {saved[k]} -> {current[k]}" for k in saved if k != "base" and saved[k] != current[k]]
    return [Problem(args_file, "--lora-r", f"{folder} holds other adapters ({', '.join(changed)}); a resumed run "
                    "keeps its adapters' shape and settings")]


def resume_problems(saved: dict, current: dict, args_file: str, folder: str, with_optimizer: bool
                    ) -> list[Problem]:
    """Why this run cannot continue the checkpoint `saved`: another model, data order or reference, or a
    layout the checkpoint cannot reshard to."""
    problems = []
    for key, value in current["architecture"].items():
        old = saved["architecture"].get(key)
        if old != value:
            problems.append(Problem(args_file, _flag(key), f"is {value} but {folder} holds a model with {old}; a "
                                    f"checkpoint resumes only its own model (valid: {old}, or a fresh run)"))
    old_data, data = saved["data"], current["data"]
    for key in ("seed", "global_batch_size"):
        if old_data[key] != data[key]:
            problems.append(Problem(args_file, _flag(key), f"is {data[key]} but {folder} was trained with "
                                    f"{old_data[key]}; the data order is a function of seed, global batch and "
                                    f"dataset, so a resumed run needs the same (valid: {old_data[key]})"))
    if old_data["dataset_sha256"] != data["dataset_sha256"]:
        problems.append(Problem(args_file, "--data-path", f"holds {data['pairs']} pairs (index sha256 "
                                f"{data['dataset_sha256'][:12]}) but {folder} was trained on {old_data['pairs']} "
                                f"pairs ({old_data['dataset_sha256'][:12]}); a resumed run needs the same dataset "
                                "(valid: the dataset it was trained on)"))
    old_ref, ref = saved["reference"], current["reference"]
    if old_ref["sha256"] != ref["sha256"]:
        problems.append(Problem(args_file, "--ref-model", f"the reference is {ref['source']} (sha256 "
                                f"{ref['sha256'][:12]}) but {folder} was trained against {old_ref['source']} "
                                f"({old_ref['sha256'][:12]}); a resumed DPO run keeps its reference (valid: "
                                f"{old_ref['source']})"))
    problems += _lora_problems(saved.get("lora"), current["lora"], args_file, folder)
    if with_optimizer:
        problems += reshard_problems(saved["layout"], current["layout"], folder)
    return problems


def reshard_problems(saved: dict, current: dict, folder: str) -> list[Problem]:
    """The model and the distributed optimizer's fully reshardable state follow any tp/pp/vpp/ep/etp/dp
    change; the plain optimizer's state only a dp change, and the two optimizers' states do not mix."""
    if saved["distributed_optimizer"] != current["distributed_optimizer"]:
        why = "the distributed and the plain optimizer keep their state in different forms"
        valid = "the checkpoint's parallelism.distributed_optimizer"
    elif not current["distributed_optimizer"] and any(saved[k] != current[k] for k in _LAYOUT_KNOBS):
        why = "only the distributed optimizer's checkpoints reshard across tp/pp/ep"
        valid = f"resume at {layout_text(saved)}"
    else:
        return []
    return [Problem(folder, "(layout)", f"saved at {layout_text(saved)}, cannot resume at {layout_text(current)}: "
                    f"{why} (valid: {valid})")]


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_start(args: argparse.Namespace, args_file: str) -> None:
    """Before anything is built (collective): refuse a fresh start over an earlier run."""
    if megatron_args.resuming(args) or args.dpoc_measure_memory:
        return
    problems = from_rank0(lambda: publish.earlier_run(args.save, args.dpoc_run_dir))
    if problems:
        raise DpocError(problems)


class Checkpointer:
    """Saves and resumes one run's policy, optimizer, scheduler and RNG; every method is collective."""

    def __init__(self, args: argparse.Namespace, args_file: str, device: Device, policy: list, optimizer,
                 scheduler, pairs: int):
        self.args, self.args_file, self.device = args, args_file, device
        self.policy, self.optimizer, self.scheduler = policy, optimizer, scheduler
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.data = data_order(args, pairs)
        self.adapters_only = lora.settings(args) is not None  # the frozen base is read from its source
        if args.save is not None:
            _in_process_results_queue()

    def due(self, iteration: int) -> bool:
        a = self.args
        return a.save is not None and (iteration == a.train_iters
                                       or (bool(a.save_interval) and iteration % a.save_interval == 0))

    # ---- resume ------------------------------------------------------------------------------------------
    def resume(self) -> tuple[int, list[str]]:
        """The step to continue from (0 without --load) and what to tell the user about it."""
        a = self.args
        if not megatron_args.resuming(a):
            return 0, []
        root = Path(a.load)
        notes = [f"removed {p}: the temporary folder of a save that did not finish"
                 for p in (publish.remove_staging(root) if self.rank == 0 else ())]
        folder, skipped = self._newest_intact(root)
        saved = json.loads((folder / RECORDS).read_text())
        current = records(a, self.world, self.data)
        problems = resume_problems(saved, current, self.args_file, str(folder), not a.no_load_optim)
        if problems:
            raise DpocError(problems)
        started = time.perf_counter()
        notes += skipped + self._load(folder, saved, restore_rng=saved["layout"] == current["layout"])
        notes.append(f"resumed from {folder}: iteration {saved['iteration']}, {saved['consumed_samples']} "
                     f"samples consumed, loaded in {time.perf_counter() - started:.2f} s")
        return saved["iteration"], notes + _context_changes(saved, current)

    def _load(self, folder: Path, saved: dict, restore_rng: bool) -> list[str]:
        """Load the policy, and unless refused by a flag the optimizer, LR schedule and RNG (Megatron's
        --no-load-optim also skips the schedule); the notes say what was left as it is."""
        a = self.args
        with_optimizer, with_rng = not a.no_load_optim, restore_rng and not a.no_load_rng
        if with_optimizer:
            optimizer_state.allocate(self.optimizer)
        schedule = self.scheduler.state_dict()
        loaded = dist_checkpointing.load(self._state(True, with_optimizer, with_rng), str(folder))
        for name, chunk in self._chunks():
            _load_policy(chunk.module, loaded[name], self.adapters_only)
        notes = []
        if with_optimizer:
            optimizer_state.restore(self.optimizer, loaded["optimizer"], saved["optimizer_step"],
                                    loaded["grad_scaler"])
            notes += _schedule_changes(loaded["opt_param_scheduler"], schedule)
            self.scheduler.load_state_dict(loaded["opt_param_scheduler"])
        else:
            self.optimizer.reload_model_params()  # the fp32 master weights follow the loaded model
            notes.append("--no-load-optim: the optimizer and the LR schedule start afresh")
        if with_rng:
            _set_rng_state(self.device, loaded["rng_state"])
        elif a.no_load_rng:
            notes.append("--no-load-rng: every rank keeps its freshly seeded generators")
        else:
            notes.append("RNG: the checkpoint's layout differs, so each rank keeps its freshly seeded generators "
                         "(the data order does not depend on them)")
        return notes

    def _newest_intact(self, root: Path) -> tuple[Path, list[str]]:
        """The newest published folder whose files all match its manifest (every rank re-hashes a share)."""
        def damage(folder: Path) -> list[Problem]:
            mine = publish.verify(folder, publish.share(publish.manifest_files(folder), self.rank, self.world))
            found = [None] * self.world
            dist.all_gather_object(found, mine)
            return [p for part in found for p in part]

        return publish.newest_intact(root, from_rank0(lambda: publish.iterations(root)), damage,
                                     "move the save and run directories away and start afresh with DPOC_RESUME=0")

    # ---- save --------------------------------------------------------------------------------------------
    def save(self, iteration: int, reason: str, say: Callable[[str], None] | None) -> None:
        """Write the checkpoint of `iteration` and publish it; `say` (rank 0) reports it."""
        a = self.args
        root = Path(a.save)
        started = time.perf_counter()
        sync_params(self.policy)  # the weights as the step left them, not the stale shards of a deferred gather
        staging = publish.staging_folder(root, iteration, from_rank0(lambda: str(os.getpid())))
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            publish.remove_staging(root)
            staging.mkdir()
        dist.barrier()
        dist_checkpointing.save(self._state(False, True, True, iteration), str(staging),
                                content_metadata=optimizer_state.sharding())
        if self.rank == 0:
            record = records(a, self.world, self.data, iteration, reason, optimizer_state.step_count(self.optimizer))
            (staging / RECORDS).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        dist.barrier()
        _pause_for_tests(iteration)
        names = from_rank0(lambda: publish.files_of(staging))
        mine = publish.file_records(staging, publish.share(names, self.rank, self.world))
        found = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, found, dst=0)
        if self.rank == 0:
            files = {name: rec for part in found for name, rec in part.items()}
            final = publish.publish(staging, files, root, iteration)
            removed = publish.prune(root, a.dpoc_keep_checkpoints)
            if reason == "preempted":
                write_atomically(root / PREEMPTED, f"{iteration}\n")
            megabytes = sum(int(f["size"]) for f in files.values()) / 1e6
            pruned = f"; removed iteration {', '.join(map(str, removed))} (keeping {a.dpoc_keep_checkpoints})" \
                if removed else ""
            if say:
                say(f"saved {final} ({reason}: {len(files)} files, {megabytes:.1f} MB) in "
                    f"{time.perf_counter() - started:.2f} s{pruned}")
        dist.barrier()

    # ---- the state ---------------------------------------------------------------------------------------
    def _chunks(self) -> Iterator[tuple[str, torch.nn.Module]]:
        """Megatron-LM's names: `model`, or `model0`, `model1`, ... per virtual pipeline chunk."""
        for i, chunk in enumerate(self.policy):
            yield ("model" if len(self.policy) == 1 else f"model{i}"), chunk

    def _state(self, is_loading: bool, with_optimizer: bool, with_rng: bool, iteration: int = 0) -> dict:
        """The sharded state dict to save, or the template to load into. Keys are the unwrapped GPTModel's."""
        state: dict = {name: _trained(chunk.module.sharded_state_dict(metadata=optimizer_state.sharding()),
                                      self.adapters_only) for name, chunk in self._chunks()}
        if with_optimizer:
            state["optimizer"] = optimizer_state.sharded_state_dict(self.optimizer, dict(state), is_loading)
            state["opt_param_scheduler"] = self.scheduler.state_dict()
            state["grad_scaler"] = optimizer_state.grad_scaler_state(self.optimizer)
        if with_rng:
            state["rng_state"] = ShardedObject("dpoc.rng_state", _rng_state(self.device), (self.world,),
                                               (self.rank,), replica_id=0)
        state["iteration"] = iteration
        return state


def _trained(model_state: dict, adapters_only: bool) -> dict:
    """What a checkpoint holds of the policy: every parameter, or under LoRA only the adapters."""
    return {k: v for k, v in model_state.items() if lora.is_adapter(k)} if adapters_only else model_state


def _load_policy(module: torch.nn.Module, state: dict, adapters_only: bool) -> None:
    """Load the saved parameters; under LoRA exactly the adapters (the base came from its source)."""
    if not adapters_only:
        module.load_state_dict(state)
        return
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if lora.is_adapter(k)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"LoRA checkpoint mismatch: missing {missing}, unexpected {result.unexpected_keys}")


def _in_process_results_queue() -> None:
    """megatron-core's writer hands its results back through a queue served by a *spawned* manager process,
    made at the first save: spawning re-imports this entry point (torch, megatron-core) in it, seconds of a
    save. Our saves are synchronous, so the results never leave this process: a plain queue serves them (an
    asynchronous save, which would need the manager, fails loudly on it: "results_queue should not be empty")."""
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def _rng_state(device: Device) -> dict:
    return {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "accelerator": device.rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(device: Device, state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    device.set_rng_state(state["accelerator"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _schedule_changes(saved: dict, current: dict) -> list[str]:
    """A rebuilt run (e.g. a larger train_iters) keeps its own schedule from the saved step on: say what moved."""
    changed = [f"{k} {saved[k]} -> {v}" for k, v in current.items() if k != "num_steps" and saved.get(k) != v]
    if not changed:
        return []
    return [f"LR schedule: {', '.join(changed)}; this run's schedule applies from step {saved['num_steps']} on"]


def _context_changes(saved: dict, current: dict) -> list[str]:
    notes = []
    if saved["plan_hash"] != current["plan_hash"]:
        notes.append(f"plan: the checkpoint was saved by plan {str(saved['plan_hash'])[:12]}, this run is plan "
                     f"{str(current['plan_hash'])[:12]}")
    if saved["layout"] != current["layout"]:
        notes.append(f"layout: resharded from {layout_text(saved['layout'])} to {layout_text(current['layout'])}")
    versions = [f"{k} {v} -> {current['versions'][k]}" for k, v in saved["versions"].items()
                if current["versions"].get(k) != v]
    if versions:
        notes.append(f"versions: {', '.join(versions)}")
    return notes


def _pause_for_tests(iteration: int) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec or int(spec.split(":", 1)[0]) != iteration:
        return
    flag = Path(spec.split(":", 1)[1])
    if dist.get_rank() == 0:
        flag.write_text(f"{iteration}\n")
    dist.barrier()
    while flag.exists():
        time.sleep(0.05)
