"""Render: Plan → the build directory's files, as an in-memory {relative path: text} map.

Shell scripts come from jinja2 templates (StrictUndefined; every value goes through the `q` filter, i.e.
`shlex.quote`); YAML and JSON are serialized, not templated. No logic here beyond picking what to render:
the values were all decided in `resolve` and in the targets' translators.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from functools import cache
from typing import Any

from dpoc import __version__, targets
from dpoc.convert import DPOC_DIR, MINDSPEED_DIR, dpoc_conversions, mindspeed_conversions
from dpoc.megatron_args import format_args
from dpoc.plan import Plan
from dpoc.targets import dpoc_runtime, mindspeed_rl

# environment scripts a node sources when they exist (CANN toolkit, NNAL/ATB)
NPU_ENV_SCRIPTS = ("/usr/local/Ascend/ascend-toolkit/set_env.sh", "/usr/local/Ascend/nnal/atb/set_env.sh")


@cache
def _env():
    import jinja2

    from dpoc import resources

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.data_dir("templates"))),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
        autoescape=False, bytecode_cache=_bytecode_cache(),
    )
    env.filters["q"] = lambda v: shlex.quote(str(v))
    return env


def _bytecode_cache():
    """Compiled templates cached per user (keyed by template source checksum), so a build skips compiling."""
    import os

    import jinja2

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = os.path.join(base, "dpoc", "jinja")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return None  # read-only home: compile every time
    return jinja2.FileSystemBytecodeCache(directory)


def _template(template: str, **values: Any) -> str:
    return _env().get_template(template).render(**values)


def _yaml(data: Any) -> str:
    import yaml

    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml when present: same text, much faster
    return yaml.dump(data, Dumper=dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=120)


def render(plan: Plan) -> dict[str, str]:
    """Every file of the build except manifest.json, keyed by path relative to the build directory."""
    plan_hash = plan.hash()
    common = {"version": __version__, "name": plan.name, "plan_hash": plan_hash}
    hw, cluster = plan.hardware, plan.cluster
    env = list(hw.env)
    env_scripts = NPU_ENV_SCRIPTS if hw.device == "npu" else ()
    node_values = dict(common, nodes=hw.nodes, nproc=hw.devices_per_node, world=hw.world_size, device=hw.device,
                       master_addr=cluster.master_addr, master_port=cluster.master_port, env=env,
                       env_scripts=env_scripts, save=plan.checkpoint.save)

    files: dict[str, str] = {"plan.json": plan.to_json()}
    for resume, path in ((False, "megatron.args"), (True, "resume/megatron.args")):
        files[path] = format_args(dpoc_runtime.megatron_args(plan, resume=resume))
    for rank, host in enumerate(cluster.hosts):
        files[f"nodes/node-{rank}.sh"] = _template("node.sh.j2", node_rank=rank, host=host, **node_values)
    files["launch.sh"] = _template("launch.sh.j2", nodes=[{"host": h, "script": f"node-{k}.sh"}
                                                          for k, h in enumerate(cluster.hosts)], **common)
    files["preprocess.yaml"] = _yaml(preprocess_config(plan))
    files["preprocess.sh"] = _template("preprocess.sh.j2", input=plan.data.input,
                                       output_prefix=plan.data.output_prefix, **common)
    for conv in dpoc_conversions(plan):
        files[f"{DPOC_DIR}/{conv.file}"] = _template("convert.sh.j2", conversion=conv, **common)
    if not mindspeed_rl.unsupported(plan):
        files.update(_mindspeed_files(plan, node_values))
        for conv in mindspeed_conversions(plan):
            files[f"{MINDSPEED_DIR}/{conv.file}"] = _template(
                "mindspeed_convert.sh.j2", title=conv.title, script=conv.script, args=conv.args,
                load_dir=conv.load_dir, save_dir=conv.save_dir, **common)
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
            "workers": d.workers}


def _mindspeed_files(plan: Plan, node_values: dict[str, Any]) -> dict[str, str]:
    name, m = plan.name, plan.model.mindspeed_name
    files = {}
    for resume, suffix in ((False, ""), (True, "_resume")):
        files[f"mindspeed-rl/dpo_{name}{suffix}.yaml"] = _yaml({
            "defaults": [{"model": [m]}],
            "megatron_training": mindspeed_rl.training_config(plan, resume=resume),
        })
    files[f"mindspeed-rl/model/{m}.yaml"] = _yaml(mindspeed_rl.model_config(plan))
    if plan.data.layout == "pairwise":  # MindSpeed-RL's preprocessing reads only pairwise columns
        files[f"mindspeed-rl/datasets/{name}.yaml"] = _yaml(mindspeed_rl.dataset_config(plan))
    for rank, host in enumerate(plan.cluster.hosts):
        files[f"mindspeed-rl/nodes/node-{rank}.sh"] = _template("mindspeed_node.sh.j2", node_rank=rank, host=host,
                                                                **node_values)
    return files


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
