"""Render: Plan → the build directory's files, as an in-memory {relative path: text} map.

Each target renders its own files (`targets/*.files`); this module collects them with the files every build
has (plan.json, launch.sh, preprocessing, weight conversion) and the manifest. No logic here beyond picking
what to render: the values were all decided in `resolve` and in the targets' translators.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from dpoc import __version__
from dpoc.compiler.render import targets
from dpoc.compiler.render.conversions import DPOC_DIR, dpoc_conversions
from dpoc.compiler.render.templating import header_values, template, yaml_text
from dpoc.compiler.resolve.cluster import SSH_OPTIONS, ray_start_options
from dpoc.contract import losses
from dpoc.contract.errors import EXIT_USER_ERROR
from dpoc.contract.plan import Plan


def render(plan: Plan) -> dict[str, str]:
    """Every file of the build except manifest.json, keyed by path relative to the build directory."""
    common = header_values(plan)
    files: dict[str, str] = {"plan.json": plan.to_json()}
    for target in targets.TARGETS.values():
        if not target.unsupported(plan):  # the runtime target always can: resolve refused the Plan otherwise
            files.update(target.files(plan))
    runtime = targets.get(plan.runtime)
    files["launch.sh"] = template("launch.sh.j2", nodes=[{"host": h, "script": runtime.node_script(k)}
                                                         for k, h in enumerate(plan.cluster.hosts)],
                                  ssh_options=SSH_OPTIONS, exit_input_error=EXIT_USER_ERROR, **common)
    resources = ray_start_options(plan.hardware.device, plan.hardware.devices_per_node)
    for role in ("head", "worker"):
        files[f"ray-{role}.sh"] = template("ray_start.sh.j2", head=role == "head", resources=resources, **common)
    files["preprocess.yaml"] = yaml_text(preprocess_config(plan))
    files["preprocess.sh"] = template("preprocess.sh.j2", input=plan.data.input,
                                      output_prefix=plan.data.output_prefix, **common)
    for conv in dpoc_conversions(plan):
        files[f"{DPOC_DIR}/{conv.file}"] = template("convert.sh.j2", conversion=conv, **common)
    return files


def skipped_targets(plan: Plan) -> dict[str, list[str]]:
    """Targets left out of the build, with the reasons (also printed on stderr)."""
    out = {}
    for name, target in targets.TARGETS.items():
        reasons = [f"{v.field}: {v.message}" for v in target.unsupported(plan)]
        if reasons:
            out[name] = reasons
    return out


def preprocess_config(plan: Plan) -> dict[str, Any]:
    d = plan.data
    return {"input": d.input, "format": d.format, "layout": d.layout, "tokenizer": d.tokenizer,
            "template": d.template, "enable_thinking": d.enable_thinking, "map_keys": dict(d.map_keys),
            "seq_length": plan.training.seq_length, "truncate": d.truncate, "output_prefix": d.output_prefix,
            "workers": d.workers, **({"unpaired": True} if losses.unpaired(plan.dpo.loss) else {})}


def file_hashes(files: dict[str, str]) -> dict[str, str]:
    """sha256 of each rendered file: manifest.json's list, which the preflight and `dpoc diff` compare."""
    return {path: hashlib.sha256(text.encode()).hexdigest() for path, text in sorted(files.items())}


def manifest(plan: Plan, files: dict[str, str]) -> str:
    return json.dumps({
        "dpoc_version": __version__,
        "plan_hash": plan.hash(),
        "runtime": plan.runtime,
        "files": file_hashes(files),
        "skipped_targets": skipped_targets(plan),
        "warnings": list(plan.warnings),
    }, indent=2, sort_keys=True) + "\n"
