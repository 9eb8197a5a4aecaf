"""`dpoc launch BUILD [--ssh | --ray [ADDRESS] [--submit]] [--max-restarts N]`."""

from __future__ import annotations

import argparse
import signal
import sys

from dpoc.contract.errors import DpocError, Problem


class Stopped(Exception):
    """SIGTERM (`dpoc jobs stop`, a scheduler): the nodes are stopped, then dpoc launch exits 143."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("build", help="the build directory (dpoc build's output), at the same path on every node")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--ssh", action="store_true", help="node k over ssh on the recipe's hardware.hosts[k]")
    where.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                       help="on a Ray cluster: one actor per node (ADDRESS, else RAY_ADDRESS, else this machine's)")
    p.add_argument("--submit", action="store_true",
                   help="with --ray: submit the launch as a Ray job and return at once (see dpoc jobs)")
    p.add_argument("--max-restarts", type=int, metavar="N",
                   help="restart the whole job up to N times after a node fails (default: launch.max_restarts)")


def run(args: argparse.Namespace) -> int:
    from dpoc.launch.job import Job, launch

    if args.max_restarts is not None and args.max_restarts < 0:
        raise DpocError([Problem("dpoc launch", "--max-restarts", f"must be >= 0 (got {args.max_restarts})")])
    job = Job.from_build(args.build)
    if args.submit:
        if args.ray is None:
            raise DpocError([Problem("dpoc launch", "--submit", "submits to a Ray cluster; valid: --ray ADDRESS "
                                     "--submit")])
        from dpoc.launch import jobs

        return jobs.submit(job, args.ray or None, args.max_restarts)
    executor = _executor(args)
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        return launch(executor, job, args.max_restarts)
    except KeyboardInterrupt:
        print("dpoc launch: interrupted; every node is stopped", file=sys.stderr)
        return 130
    except Stopped:
        print("dpoc launch: stopped (SIGTERM); every node is stopped", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
        close = getattr(executor, "close", None)
        if close is not None:
            close()


def _executor(args: argparse.Namespace):
    if args.ssh:
        from dpoc.launch.ssh import SshExecutor

        return SshExecutor()
    if args.ray is not None:
        from dpoc.launch.ray import RayExecutor

        return RayExecutor(args.ray or None)
    from dpoc.launch.local import LocalExecutor

    return LocalExecutor()


def _stopped(signum, frame) -> None:
    raise Stopped()
