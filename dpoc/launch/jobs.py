"""Launches submitted to Ray's job server: `dpoc launch BUILD --ray ADDRESS --submit`, then
`dpoc jobs status|logs|stop ID`.

Ray Jobs runs `dpoc launch BUILD --ray` as the job's driver (in the submitter's working directory and with its
Python: paths are identical on every node) and keeps its status and logs, so there is no registry of our own.
The submission id is `dpoc-<run name>-<Plan hash[:12]>`; Ray never reuses an id, so a rerun of a finished launch
gets `-2`, `-3`, …, and a build still running is refused. ADDRESS is what Ray's job client takes: the dashboard
(http://HEAD:8265), the cluster address, or `auto`; RAY_ADDRESS overrides it, as in Ray's own CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from typing import Any

from dpoc.contract.errors import DpocError, Problem
from dpoc.launch.job import Job
from dpoc.launch.ray import import_ray

STOP_WAIT_S = 30.0


def submission_id(job: Job, taken: set[str]) -> str:
    base = f"dpoc-{job.name}-{job.plan_hash[:12]}"
    sid, n = base, 2
    while sid in taken:
        sid, n = f"{base}-{n}", n + 1
    return sid


def submit(job: Job, address: str | None, max_restarts: int | None) -> int:
    client = _client(address)
    prefix = f"dpoc-{job.name}-{job.plan_hash[:12]}"
    ours = {j.submission_id: j.status for j in client.list_jobs() if (j.submission_id or "").startswith(prefix)}
    running = sorted(sid for sid, status in ours.items() if not status.is_terminal())
    if running:
        raise DpocError([Problem("dpoc launch", "--submit", f"this build is already on Ray as {running[0]} "
                                 f"({ours[running[0]]}); valid: dpoc jobs stop {running[0]}, then submit again")])
    command = [sys.executable, "-m", "dpoc", "launch", str(job.build), "--ray"]
    if max_restarts is not None:
        command += ["--max-restarts", str(max_restarts)]
    env = {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}  # a dpoc run from a checkout
    sid = client.submit_job(entrypoint=f"cd {shlex.quote(str(job.workdir))} && {shlex.join(command)}",
                            submission_id=submission_id(job, set(ours)), runtime_env={"env_vars": env} if env else None,
                            metadata={"dpoc_build": str(job.build), "dpoc_plan_hash": job.plan_hash})
    print(sid)
    print(f"dpoc launch: submitted {job.name} as Ray job {sid}: dpoc jobs status|logs|stop {sid}", file=sys.stderr)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["status", "logs", "stop"])
    p.add_argument("id", help="the submission id dpoc launch --submit printed")
    p.add_argument("--address", help="Ray's job server (default: RAY_ADDRESS, else this machine's cluster)")
    p.add_argument("--follow", action="store_true", help="logs: keep printing until the job ends")


def run(args: argparse.Namespace) -> int:
    client = _client(args.address)
    status = _status(client, args.id)
    if args.action == "status":
        info = client.get_job_info(args.id)
        print(f"{args.id}: {status}" + (f" ({info.message})" if info.message else ""))
    elif args.action == "logs":
        if args.follow:
            asyncio.run(_follow(client, args.id))
        else:
            print(client.get_job_logs(args.id), end="")
    else:
        client.stop_job(args.id)
        deadline = time.monotonic() + STOP_WAIT_S
        while not status.is_terminal() and time.monotonic() < deadline:
            time.sleep(0.5)
            status = _status(client, args.id)
        print(f"{args.id}: {status}")
    return 0


async def _follow(client: Any, sid: str) -> None:
    async for chunk in client.tail_job_logs(sid):
        print(chunk, end="", flush=True)


def _status(client: Any, sid: str):
    try:
        return client.get_job_status(sid)
    except RuntimeError as exc:
        if "does not exist" in str(exc):
            raise DpocError([Problem("dpoc jobs", sid, "no such Ray job on this cluster; valid: the id dpoc launch "
                                     "--submit printed")]) from None
        raise


def _client(address: str | None):
    import_ray()
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address or None)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        shown = os.environ.get("RAY_ADDRESS") or address or "auto"
        raise DpocError([Problem("dpoc jobs", "--address", f"cannot reach Ray's job server at {shown} ({exc}); "
                                 "valid: the head's dashboard address, e.g. http://HEAD:8265")]) from None
