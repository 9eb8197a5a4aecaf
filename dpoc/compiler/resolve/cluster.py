"""Where a job's nodes run: which addresses are this machine's loopback, how nodes are reached over ssh, and
what each node asks of Ray. The compiler (rules, rendered scripts) and the launcher share these facts."""

from __future__ import annotations

import json

# ssh never prompts (BatchMode: key-based login or a clear failure), gives up on an unreachable host in seconds
# instead of waiting silently, and notices a node that dies mid-run (no reply to 4 keep-alives 15 s apart).
SSH_CONNECT_TIMEOUT_S = 10
SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}",
               "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4")

# the Ray resource one device of each kind is (`NPU` is Ray's built-in resource for Ascend devices)
RAY_RESOURCE = {"npu": "NPU", "cuda": "GPU", "cpu": "CPU"}

_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", "::1"}


def is_loopback(host: str) -> bool:
    """An address that names whichever machine reads it (so never a master for other machines)."""
    host = host.lower()
    return host in _LOOPBACK_NAMES or host.startswith("127.")


def ray_bundle(device: str, devices_per_node: int) -> dict[str, float]:
    """One node's placement-group bundle: its devices as Ray resources (cpu: one CPU per process)."""
    return {RAY_RESOURCE[device]: float(devices_per_node)}


def ray_start_options(device: str, devices_per_node: int) -> list[str]:
    """`ray start` options that make a node offer exactly one bundle's devices (its CPUs are Ray's own count,
    except on cpu, where the processes are the devices: a node of fewer cores still takes its bundle)."""
    n = str(devices_per_node)
    if device == "cpu":
        return ["--num-cpus", n]
    if device == "cuda":
        return ["--num-gpus", n]
    return ["--resources", json.dumps({RAY_RESOURCE[device]: devices_per_node})]
