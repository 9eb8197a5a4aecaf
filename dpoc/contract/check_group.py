"""The device self-check's process group (`dpoc preflight BUILD --device`): one transformer layer of the plan's
model, sharded at the plan's tp / ep, in as many local processes as that sharding needs, never more than a node
holds.

Three places read it and must agree: the launcher (how many processes torchrun starts,
`dpoc/launch/preflight.py`), each process of the check (the layer's parallel sizes,
`dpoc/runtime/device_check.py`) and the planner's estimate of that layer (`dpoc/planner/one_layer.py`).

The group is the smallest that holds the sharding: lcm(tp, etp * ep) processes (dense layers need tp | world,
experts etp * ep | world; with etp = tp that is tp * ep). Where that exceeds the node's devices, the
sharding shrinks, keeping each rank's shapes where it can: tp, then etp, to their largest divisors that fit,
then ep to its largest divisor that fits, with the layer's routed experts cut to the plan's experts per rank
times the smaller ep (so every rank still holds `num_experts / ep` experts, as in the run). tp and etp are
never cut on a node that holds them (the planner never spans tp over nodes).

A group of more than one process reports through files in a fresh folder the launcher names in
`REPORT_ENV`: rank 0 writes the check's lines, a process that fails its one problem line with the time it
failed; the launcher prints the first failure alone (the others follow from it: a peer's broken collective,
torchrun stopping the group).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpoc.contract.errors import Problem

REPORT_ENV = "DPOC_DEVICE_CHECK_REPORT"
LINES = "lines.json"
FAILURE = "failure-{rank}.json"


@dataclass(frozen=True)
class CheckGroup:
    """The checked layer's sharding and the processes it runs in."""

    processes: int
    tp: int
    ep: int
    etp: int
    num_experts: int  # the checked layer's routed experts (0: dense)
    capped: bool  # the node has fewer devices than the plan's sharding needs: ep (or tp, etp) is smaller

    def describe(self) -> str:
        """`tp2 ep4 (of 8: 64 experts), 8 processes`: what the check's line names."""
        shards = f"tp{self.tp}" + (f" ep{self.ep} etp{self.etp}" if self.num_experts else "")
        noun = "process" if self.processes == 1 else "processes"
        return f"{shards}{', capped to the node' if self.capped else ''}, {self.processes} {noun}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def check_group(tp: int, ep: int, etp: int, num_experts: int, topk: int, devices: int) -> CheckGroup:
    """The group for a plan sharded tp / ep / etp over `num_experts` routed experts (0: dense, where ep and etp
    do not apply) on a node of `devices` devices."""
    if not num_experts:
        ep = etp = 1
    tp_fit = next(d for d in _divisors(tp) if d <= devices)
    etp_fit = next(d for d in _divisors(etp) if math.lcm(tp_fit, d) <= devices)
    ep_fit = next(d for d in _divisors(ep) if math.lcm(tp_fit, etp_fit * d) <= devices)
    experts = num_experts
    if num_experts and ep_fit < ep:
        # each rank keeps the run's experts (num_experts / ep), and the router still has its top-k to pick
        experts = max(num_experts // ep, math.ceil(topk / ep_fit)) * ep_fit
    return CheckGroup(processes=math.lcm(tp_fit, etp_fit * ep_fit), tp=tp_fit, ep=ep_fit, etp=etp_fit,
                      num_experts=experts, capped=(tp_fit, etp_fit, ep_fit) != (tp, etp, ep))


def plan_group(plan: dict[str, Any]) -> CheckGroup:
    """The group for the build whose plan.json is `plan`, on a node of the plan's devices."""
    layout, moe = plan["layout"], plan["model"].get("moe") or {}
    return check_group(layout["tp"], layout["ep"], layout["etp"], moe.get("num_experts", 0), moe.get("topk", 0),
                       plan["hardware"]["devices_per_node"])


def _write(path: Path, record: Any) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(record))
    os.replace(partial, path)


def write_lines(folder: str | Path, lines: list[str]) -> None:
    _write(Path(folder) / LINES, lines)


def write_failure(folder: str | Path, rank: int, problem: Problem) -> None:
    _write(Path(folder) / FAILURE.format(rank=rank),
           {"time": time.time(), "rank": rank, "file": problem.file, "where": problem.where,
            "message": problem.message})


def read_report(folder: str | Path) -> tuple[list[str] | None, Problem | None]:
    """(rank 0's lines, or None; the earliest failure, or None)."""
    folder = Path(folder)
    lines = json.loads((folder / LINES).read_text()) if (folder / LINES).is_file() else None
    failures = [json.loads(p.read_text()) for p in folder.glob(FAILURE.format(rank="*"))]
    first = min(failures, key=lambda f: (f["time"], f["rank"]), default=None)
    return lines, Problem(first["file"], first["where"], first["message"]) if first else None
