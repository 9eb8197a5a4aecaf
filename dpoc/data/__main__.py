"""`python -m dpoc.data CONFIG [flags]`: the preprocess command without the main `dpoc` CLI."""

from __future__ import annotations

import argparse
import sys

from dpoc.data.cli import add_arguments, run
from dpoc.errors import EXIT_USER_ERROR, DpocError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpoc.data", description=(__doc__ or "").strip())
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except DpocError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
