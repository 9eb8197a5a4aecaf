"""The writers every rendered file goes through: jinja2 templates for shell scripts, PyYAML for YAML.

Templates run with StrictUndefined and a `q` filter (`shlex.quote`) for every value; YAML is serialized, not
templated. Shared by `render` and the targets, each of which renders its own files.
"""

from __future__ import annotations

import shlex
from functools import cache
from typing import Any

from dpoc import __version__
from dpoc.contract.plan import Plan

# environment scripts a node sources when they exist (CANN toolkit, NNAL/ATB)
NPU_ENV_SCRIPTS = ("/usr/local/Ascend/ascend-toolkit/set_env.sh", "/usr/local/Ascend/nnal/atb/set_env.sh")


@cache
def _env():
    import jinja2

    from dpoc.contract import resources

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


def template(template_file: str, **values: Any) -> str:
    return _env().get_template(template_file).render(**values)


def yaml_text(data: Any) -> str:
    import yaml

    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml when present: same text, much faster
    return yaml.dump(data, Dumper=dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=120)


def header_values(plan: Plan) -> dict[str, Any]:
    """What every script's header names: the dpoc version, the recipe and the Plan hash."""
    return {"version": __version__, "name": plan.name, "plan_hash": plan.hash()}


def node_hosts(plan: Plan) -> list[tuple[int, str | None]]:
    """(rank, host) for every node; the host is None when the recipe names none (the launcher places the node)."""
    hosts = plan.cluster.hosts
    return [(rank, hosts[rank] if hosts else None) for rank in range(plan.hardware.nodes)]


def node_values(plan: Plan) -> dict[str, Any]:
    """What every target's node scripts share: the world, the master, the environment, the save directory."""
    hw, cluster = plan.hardware, plan.cluster
    return dict(header_values(plan), nodes=hw.nodes, nproc=hw.devices_per_node, world=hw.world_size,
                device=hw.device, master_addr=cluster.master_addr, master_port=cluster.master_port,
                env=list(hw.env), env_scripts=NPU_ENV_SCRIPTS if hw.device == "npu" else (),
                save=plan.checkpoint.save)
