"""Several training runs in one process, one after another, for the tests that need one first step of each
of several losses: each run is `dpoc.runtime.train`'s own entry on its own megatron.args (its process group
and megatron-core's parallel state set up and torn down by the runtime), and importing torch and megatron-core
is paid once instead of once per run.

    python -m tests.runtime.train_runs ARGS_FILE...   (exit code: the first run's that failed, else 0)
"""

from __future__ import annotations

import os
import sys

_RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def main(args_files: list[str]) -> int:
    from dpoc.runtime import train

    for args_file in args_files:
        for name in _RENDEZVOUS:  # each run makes its own one-process group on a fresh port
            os.environ.pop(name, None)
        code = train.main([f"@{args_file}"])
        if code:
            print(f"train_runs: {args_file} exited {code}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":  # dist checkpointing spawns helper processes that re-import this module
    sys.exit(main(sys.argv[1:]))
