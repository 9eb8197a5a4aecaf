"""Node preflight: the checks that need the node's own files, run by each node script before torchrun.

The compiler never touches cluster paths (resolve is pure); this is where they are checked: the build is
intact (files match manifest.json), the dataset, tokenizer and initial weights exist (a Hugging Face
directory's config.json must match megatron.args: the runtime's own check), the dataset was made with this
build's preprocess.yaml (its stats say so; a MindSpeed-LLM dataset without them is accepted with a warning),
on resume the checkpoint is there, with precomputed reference log-probs whether their file is current (a
warning: the node script's reference.sh computes it next), and a fresh start of the dpoc runtime would not
overwrite an earlier run's metrics or checkpoints (the runtime checks the same at its start). For MindSpeed-
RL, whose legacy checkpoints are per rank, the checkpoint's layout must be exactly the Plan's; a mismatch is
refused with the conversion that fixes it. Given the node's rank (the node scripts pass it), the node itself
is checked too (`node_checks`): the launcher's build, the devices, the runtime's packages, the master. A Hugging
Face directory's safetensors files must be as long as their headers say. Exit 2,
one line per problem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpoc.compiler.render import targets
from dpoc.compiler.render.conversions import DPOC_DIR, MINDSPEED_DIR
from dpoc.contract.check_group import REPORT_ENV, CheckGroup, plan_group, read_report
from dpoc.contract.errors import DpocError, Problem
from dpoc.contract.requirements import TORCH_NPU
from dpoc.contract.runs import CHECKPOINT_MARKER, FIRST_FAILURE, TRACKER
from dpoc.launch import node_checks
from dpoc.runtime.checkpoint.publish import earlier_run, no_checkpoint

# the device check's group must answer within this (a hung collective otherwise waits for its own timeout)
DEVICE_CHECK_TIMEOUT_S = 600


@dataclass(frozen=True)
class Node:
    """Who runs the preflight: the node's rank, the master it will join, the Plan hash its launcher started."""

    rank: int
    master_addr: str
    master_port: int
    plan_hash: str | None = None  # None: started by hand, no launcher to agree with


def preflight(build_dir: str | Path, mode: str, target: str = "dpoc", node: Node | None = None) -> list[str]:
    """Raise DpocError with every problem found; return the warnings (the CLI prints them)."""
    build = Path(build_dir)
    manifest_path = build / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise DpocError([Problem(str(manifest_path), "(file)", f"cannot read the build's manifest: {exc}")]) from None
    problems = _edited_files(build, manifest)
    plan = json.loads((build / "plan.json").read_text())
    if node is not None:
        problems += _node(build, plan, target, node)
    found, warnings = _inputs(build, plan)
    problems += found
    if target == "dpoc" and plan["dpo"].get("reference") == "precomputed" and not found:
        warnings += _reference_logps(build)
    ck = plan["checkpoint"]
    if mode == "resume":
        if not (Path(ck["save"]) / TRACKER).is_file():
            problems.append(no_checkpoint(ck["save"]))
        elif target == "mindspeed-rl":
            problems += legacy_layout_problems(ck["save"], plan["layout"], build)
    elif target == "mindspeed-rl":
        for key in ("mindspeed_load", "mindspeed_ref_model"):
            if ck[key] is None:
                continue
            if not Path(ck[key]).is_dir():
                problems.append(Problem(ck[key], "(directory)", f"checkpoint.{key} not found on this node; run "
                                        f"{build / MINDSPEED_DIR / 'hf_to_mcore.sh'} first"))
            else:
                problems += legacy_layout_problems(ck[key], plan["layout"], build)
    else:
        problems += earlier_run(ck["save"], plan["run_dir"])
        problems += _initial_weights(build, ck)
    if problems:
        raise DpocError(list(dict.fromkeys(problems)))
    return warnings


def device_check(build_dir: str | Path, planner: Callable[[dict[str, Any], CheckGroup], Any] | None = None
                 ) -> list[str]:
    """`dpoc preflight BUILD --device`: the runtime's device self-check for the build's megatron.args
    (`dpoc/runtime/device_check.py`) in the group `check_group.plan_group` sizes (one process here, or a torchrun
    group of local processes); one line per op checked, DpocError with one line naming the first op that
    failed. `planner(plan, group)`: the planner's estimate of the checked layer (the CLI's), printed beside the
    measured figures."""
    build = Path(build_dir)
    args_file = build / "megatron.args"
    if not args_file.is_file():
        raise DpocError([Problem(str(args_file), "(file)", "not found: the device check runs the dpoc target's "
                                 "megatron.args (valid: a build directory of runtime dpoc)")])
    plan = json.loads((build / "plan.json").read_text())
    group, devices = plan_group(plan), plan["hardware"]["devices_per_node"]
    figures = dataclasses.asdict(planner(plan, group)) if planner is not None else None
    if group.processes == 1:
        from dpoc.runtime import device_check as check

        return check.run(str(args_file), devices, figures)
    return _group_check(str(args_file), group, devices, figures)


def _group_check(args_file: str, group: CheckGroup, devices: int, figures: dict[str, float] | None) -> list[str]:
    """The check as `group.processes` local processes (dpoc.runtime.torchrun, a rendezvous of its own on a free
    port); their output goes to a log, kept only when they fail without a report of their own."""
    command = [sys.executable, "-m", "dpoc.runtime.torchrun", "--standalone", "--nproc_per_node",
               str(group.processes), "-m", "dpoc.runtime.device_check", args_file, "--devices", str(devices)]
    if figures is not None:
        command += ["--planner", json.dumps(figures)]
    with tempfile.TemporaryDirectory(prefix="dpoc-device-check-") as folder:
        log = Path(folder) / "output.log"
        with open(log, "w") as out:
            torchrun = subprocess.Popen(command, env={**os.environ, REPORT_ENV: folder}, stdout=out,
                                        stderr=subprocess.STDOUT)
            try:
                code = torchrun.wait(timeout=DEVICE_CHECK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                torchrun.terminate()  # torchrun passes SIGTERM on to its workers
                torchrun.wait()
                code = None
        lines, failure = read_report(folder)
        if code == 0 and lines is not None:
            return lines
        if failure is not None:
            raise DpocError([failure])
        kept = Path(tempfile.mkstemp(prefix="dpoc-device-check-", suffix=".log")[1])
        shutil.copyfile(log, kept)
    said = [line for line in kept.read_text(errors="replace").splitlines()
            if line.startswith(FIRST_FAILURE.split("{")[0])]
    why = (f"no result within {DEVICE_CHECK_TIMEOUT_S} s" if code is None else
           said[-1].removeprefix("[dpoc] ") if said else f"torchrun exited with code {code}")
    raise DpocError([Problem(args_file, "device check", f"{why}, before any process reported ({group.describe()}; "
                             f"their output: {kept}; skip the check: DPOC_DEVICE_CHECK=0)")])


def _reference_logps(build: Path) -> list[str]:
    """Precomputed reference log-probs: whether this node sees a current file (node 0 must have it when training
    starts; the node script runs reference.sh first, which computes it when it is missing or stale)."""
    from dpoc.contract import megatron_args
    from dpoc.runtime.reference import reference_file

    try:
        found = reference_file.status(megatron_args.parse([f"@{build / 'megatron.args'}"]))
    except DpocError as exc:  # the reference's weights: _initial_weights and the runtime name what is wrong
        return [f"precomputed reference log-probs not checked: {exc.problems[0]}"]
    if found.current:
        return []
    return [f"precomputed reference log-probs {found.path}: {found.why}; {build / 'reference.sh'} computes them "
            "before training (the node script runs it)"]


def _initial_weights(build: Path, ck: dict[str, Any]) -> list[Problem]:
    """The dpoc runtime's initial weights: Hugging Face directories whose config.json fits megatron.args (the
    runtime's own check), converted checkpoints that exist."""
    from dpoc.contract import megatron_args
    from dpoc.contract.hf_config import mismatches
    from dpoc.runtime.weights.weight_identity import PER_RANK, is_per_rank, latest_iteration_folder

    args_file = str(build / "megatron.args")
    sources = [("model.hf_weights", ck["hf_weights"])] if ck["init"] == "hf" else []
    if ck["init"] == "converted":
        sources.append(("checkpoint.load", ck["load"]))
    if ck["ref_model"] is not None and ck["ref_model"] not in (ck["hf_weights"], ck["load"]):
        sources.append(("checkpoint.ref_model", ck["ref_model"]))
    out = []
    for field, path in sources:
        if (Path(path) / "config.json").is_file():
            try:
                out += mismatches(megatron_args.parse([f"@{args_file}"]), path, args_file, field)
            except DpocError as exc:
                out += exc.problems
            out += _safetensors(path)
        elif not Path(path, CHECKPOINT_MARKER).is_file() and not Path(path, TRACKER).is_file():
            hint = f"; run {build / DPOC_DIR / 'hf_to_mcore.sh'} first" if field == "checkpoint.load" else ""
            out.append(Problem(path, "(directory)", f"{field} not found on this node: neither Hugging Face weights "
                               f"(config.json) nor a distributed checkpoint ({CHECKPOINT_MARKER}){hint}"))
        elif Path(path, TRACKER).is_file() and is_per_rank(folder := latest_iteration_folder(Path(path))):
            out.append(Problem(str(folder), "(directory)", f"{field} {PER_RANK}"))
    return out


def _safetensors(hf_dir: str) -> list[Problem]:
    """Each safetensors file's header against its size: a cut download fails here, not inside the loader."""
    from dpoc.runtime.weights import safetensors_header

    return safetensors_header.problems(hf_dir)


def _node(build: Path, plan: dict[str, Any], target: str, node: Node) -> list[Problem]:
    import socket

    name = f"node {node.rank} ({socket.gethostname()})"
    actual = hashlib.sha256((build / "plan.json").read_bytes()).hexdigest()
    if node.plan_hash and node.plan_hash != actual:
        return [Problem(name, str(build / "plan.json"), f"is plan {actual[:12]}, but the launcher started plan "
                        f"{node.plan_hash[:12]}: this node holds another build; fix: copy the launching machine's "
                        "build directory to this node at the same path (or rebuild both from the same recipe)")]
    hw = plan["hardware"]
    requirements = targets.get(target).requirements()
    out = node_checks.devices(name, hw["device"], hw["devices_per_node"])
    if hw["device"] == "npu":
        out += node_checks.packages(name, [*requirements, TORCH_NPU]) + node_checks.ascend_stack(name)
    else:
        out += node_checks.packages(name, requirements)
    return out + node_checks.master(name, node.rank, node.master_addr, node.master_port)


def _edited_files(build: Path, manifest: dict[str, Any]) -> list[Problem]:
    out = []
    for rel, digest in manifest["files"].items():
        path = build / rel
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            out.append(Problem(str(path), "(file)", "differs from manifest.json: the build was edited or is "
                               "incomplete; rebuild it with dpoc build"))
    return out


def _inputs(build: Path, plan: dict[str, Any]) -> tuple[list[Problem], list[str]]:
    """The dataset (complete, and made with this build's preprocess.yaml) and the tokenizer."""
    import yaml

    from dpoc.data import identity
    from dpoc.data.pairwise import dataset_files

    data, out, warnings = plan["data"], [], []
    config = yaml.safe_load((build / "preprocess.yaml").read_text())
    expected = dataset_files(data["output_prefix"], bool(config.get("unpaired")))
    missing = [f for f in expected if not Path(f).is_file()]
    rebuild = f"run bash {build / 'preprocess.sh'}"
    if missing:
        out.append(Problem(missing[0], "(file)", f"missing preprocessed dataset ({len(missing)} of {len(expected)} "
                           f"files absent); {rebuild} first"))
    else:
        out, warnings = identity.check(data["output_prefix"], identity.settings(config), rebuild)
    if not Path(data["tokenizer"]).is_dir():
        out.append(Problem(data["tokenizer"], "(directory)", "tokenizer directory not found on this node"))
    return out, warnings


def expected_rank_dirs(layout: dict[str, Any]) -> set[str]:
    """MindSpeed-LLM legacy checkpoint folders: mp_rank_TT[_PPP][_EEE], suffixes only when pp>1 / ep>1."""
    tp, pp, ep = layout["tp"], layout["pp"], layout["ep"]
    return {f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") + (f"_{e:03d}" if ep > 1 else "")
            for t in range(tp) for p in range(pp) for e in range(ep)}


def legacy_layout_problems(checkpoint: str, layout: dict[str, Any], build: Path) -> list[Problem]:
    tracker = Path(checkpoint) / TRACKER
    if not tracker.is_file():
        return [Problem(checkpoint, TRACKER, "not a Megatron checkpoint (no tracker file)")]
    it = tracker.read_text().strip()
    name = "release" if it == "release" else f"iter_{int(it):07d}"
    folder = Path(checkpoint) / name
    found = {p.name for p in folder.glob("mp_rank_*") if p.is_dir()}
    expected = expected_rank_dirs(layout)
    if found == expected:
        return []
    lay = f"tp={layout['tp']} pp={layout['pp']} ep={layout['ep']}"
    span = f"{min(expected)} … {max(expected)}"
    return [Problem(f"{checkpoint}/{name}", "(layout)", f"holds {len(found)} rank folders, but {lay} needs "
                    f"{len(expected)} ({span}); MindSpeed-RL checkpoints are per rank: reconvert with "
                    f"{build / MINDSPEED_DIR / 'hf_to_mcore.sh'}")]
