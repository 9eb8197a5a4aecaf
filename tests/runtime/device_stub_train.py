"""`dpoc.runtime.train` on the npu or cuda stand-in (device_stubs.py), for test_device_stubs.py:

    python tests/runtime/device_stub_train.py KIND @ARGS_FILE    (also under torchrun)
    python -m tests.runtime.device_stub_train KIND @ARGS_FILE      (as batch_driver.py runs it: `main(argv)`)
"""

import sys

from tests.runtime import device_stubs


def main(argv: list[str]) -> int:
    """Install the stand-in (once per process: every run of a launch is on one kind) and train."""
    kind, rest = argv[0], argv[1:]
    if device_stubs.installed != [kind]:
        device_stubs.install(kind)
    from dpoc.runtime import train

    return train.main(rest)


if __name__ == "__main__":  # dist checkpointing spawns helper processes that re-import this module
    sys.exit(main(sys.argv[1:]))
