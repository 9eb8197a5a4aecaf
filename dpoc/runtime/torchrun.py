"""torchrun as the node scripts start it: the same launcher (`torch.distributed.run`), but a failed rank ends in
one line naming the rank that failed first and its exit code, instead of torchrun's own traceback and boxed
report (about 40 lines after the ranks' own output, which is passed through unchanged).

torchrun still exits 1 for any failed worker; the node script turns an input error into exit 2 itself
(`dpoc/contract/runs.py`). `dpoc launch` finds the first failing rank's error by the line written here.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from argparse import Namespace
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from dpoc.contract.runs import first_failure_line
from dpoc.runtime.known_warnings import MARKS_ENV


def main(argv: Sequence[str] | None = None) -> int:
    """torchrun with one line per failure; exit 1 if a rank failed."""
    # the agent's per-worker "closing signal" / "failed" log lines repeat what the line below says
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    # the ranks' warning markers live in a directory this launcher removes, not loose in the temp directory
    # and so do torchrun's own per-run log files (without --log-dir it leaves a torchelastic_* directory there)
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    with tempfile.TemporaryDirectory(prefix="dpoc-torchrun-") as own:
        os.environ[MARKS_ENV] = own
        args.log_dir = args.log_dir or own
        try:
            return _run(args)
        finally:
            os.environ.pop(MARKS_ENV, None)


def _run(args: Namespace) -> int:
    try:
        run(args)
    except ChildFailedError as failed:
        rank, first = failed.get_first_failure()
        others = sorted(r for r in failed.failures if r != rank)
        print(first_failure_line(rank, first.exitcode, len(others)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
