"""What a node needs before its devices wait on each other: the devices, the runtime's packages, the master.

Run by the node preflight (`dpoc preflight BUILD --node-rank K ...`, which every node script calls) on the node
itself. Each problem names the node and the fix. Cheap on purpose: package versions come from the installed
distributions' metadata (no `import torch`), devices from the device files or the visibility variable the
launcher (Ray) sets.
"""

from __future__ import annotations

import errno
import glob
import importlib.metadata
import importlib.util
import os
import re
import socket
import sys
from pathlib import Path

from dpoc.contract.errors import Problem
from dpoc.contract.requirements import Requirement

MASTER_CONNECT_TIMEOUT_S = 5.0
CANN_MINIMUM = (8, 1)  # the oldest CANN of the torch_npu 2.5.1 stacks MindSpeed-RL lists (8.1.RC1)

# device kind -> (variable that restricts the visible devices, the device files of this node)
_VISIBILITY = {"npu": ("ASCEND_RT_VISIBLE_DEVICES", "/dev/davinci", r"/dev/davinci\d+"),
               "cuda": ("CUDA_VISIBLE_DEVICES", "/dev/nvidia", r"/dev/nvidia\d+")}


def devices(node: str, device: str, per_node: int) -> list[Problem]:
    """The node must see at least the devices it starts processes for (cpu processes share the cores)."""
    if device not in _VISIBILITY:
        return []
    variable, files, pattern = _VISIBILITY[device]
    visible = os.environ.get(variable)
    if visible is not None:
        count, seen = len([d for d in visible.split(",") if d.strip()]), f"{variable}={visible}"
    else:
        count, seen = len([p for p in glob.glob(files + "*") if re.fullmatch(pattern, p)]), f"{files}N"
    if count >= per_node:
        return []
    fix = ("install the Ascend driver, or run on an Atlas node" if device == "npu" else
           "install the NVIDIA driver, or run on a GPU node")
    return [Problem(node, "hardware.devices_per_node", f"{per_node} {device} processes per node, but {count} devices "
                    f"are visible ({seen}); fix: {fix}, or set hardware.devices_per_node={count} and rebuild")]


def packages(node: str, requirements: list[Requirement]) -> list[Problem]:
    """Each package findable on this node's Python path at a version the target runs with."""
    out = []
    for req in requirements:
        wanted = _range(req)
        if not _findable(req.module):
            out.append(Problem(node, req.dist, f"not importable here ({sys.executable}); fix: install "
                               f"{req.dist}{wanted} in the environment the node scripts run in"))
            continue
        found = _version(req.dist)
        if found is None:
            continue  # sources on the Python path without metadata (MindSpeed-RL copies Megatron in): version unknown
        v = _parse(found)
        if (req.minimum and v < req.minimum) or (req.below and v >= req.below):
            out.append(Problem(node, req.dist, f"{found} is installed, but the runtime needs {req.dist}{wanted}; "
                               f"fix: pip install '{req.dist}{wanted}'"))
    return out


def ascend_stack(node: str) -> list[Problem]:
    """torch_npu built for the installed torch, and a CANN toolkit recent enough for it."""
    out = []
    torch, torch_npu = _version("torch"), _version("torch_npu")
    if torch and torch_npu and _parse(torch)[:3] != _parse(torch_npu)[:3]:
        out.append(Problem(node, "torch_npu", f"{torch_npu} is built for another torch than the installed {torch}; "
                           f"fix: install the torch_npu release of torch {'.'.join(map(str, _parse(torch)[:3]))}"))
    home = Path(os.environ.get("ASCEND_TOOLKIT_HOME", "/usr/local/Ascend/ascend-toolkit/latest"))
    if not home.is_dir():
        out.append(Problem(node, "CANN", f"toolkit not found ({home}); fix: install CANN >= "
                           f"{'.'.join(map(str, CANN_MINIMUM))} and source its set_env.sh (the node script sources "
                           "/usr/local/Ascend/ascend-toolkit/set_env.sh when it exists)"))
        return out
    version = _cann_version(home)
    if version and _parse(version)[:2] < CANN_MINIMUM:
        out.append(Problem(node, "CANN", f"{version} at {home} is older than "
                           f"{'.'.join(map(str, CANN_MINIMUM))}; fix: upgrade CANN to the release of your torch_npu"))
    return out


def master(node: str, rank: int, addr: str, port: int) -> list[Problem]:
    """Rank 0: the master address is this node's and its port is free. Other ranks: the master is reachable
    (a refused connection counts: the host answered, torchrun on node 0 may not listen yet)."""
    where = f"master {addr}:{port}"
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        return [Problem(node, where, f"{addr} does not resolve on this node; fix: put node 0's IP address in "
                        "hardware.hosts, or add the name to /etc/hosts")]
    if rank == 0:
        return _master_here(node, where, family, sockaddr, port)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(MASTER_CONNECT_TIMEOUT_S)
        try:
            s.connect(sockaddr)
        except ConnectionRefusedError:
            pass
        except OSError as exc:
            why = f"timed out after {MASTER_CONNECT_TIMEOUT_S:g} s" if isinstance(exc, TimeoutError) else exc.strerror
            return [Problem(node, where, f"unreachable from this node ({why}); fix: check the network between this "
                            "node and node 0 (route, firewall), or the address in hardware.hosts")]
    return []


def _master_here(node: str, where: str, family: int, sockaddr: tuple, port: int) -> list[Problem]:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((sockaddr[0], 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return [Problem(node, where, f"{sockaddr[0]} is not an address of this node, which is node 0; fix: "
                                "list node 0's own address first in hardware.hosts (or set hardware.master_addr)")]
            raise
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torchrun's store binds it
        try:
            s.bind(("", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return [Problem(node, where, f"port {port} is in use on this node; fix: stop what holds it, or pick "
                                "a free one (DPOC_MASTER_PORT, or hardware.master_port)")]
            raise
    return []


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails to import
        return False


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _parse(version: str) -> tuple[int, ...]:
    """The leading release numbers: '2.7.1+cpu' -> (2, 7, 1), '8.1.RC1' -> (8, 1)."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(x) for x in match.group(0).split(".")) if match else ()


def _range(req: Requirement) -> str:
    parts = [f">={'.'.join(map(str, req.minimum))}"] if req.minimum else []
    parts += [f"<{'.'.join(map(str, req.below))}"] if req.below else []
    return ",".join(parts)


def _cann_version(home: Path) -> str | None:
    for info in sorted(home.glob("*/ascend_toolkit_install.info")):
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("version="):
                return line.split("=", 1)[1].strip()
    return None
