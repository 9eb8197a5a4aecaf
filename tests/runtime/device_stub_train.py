"""`dpoc.runtime.train` on the npu or cuda stand-in (device_stubs.py), for test_device_stubs.py:

    python tests/runtime/device_stub_train.py KIND @ARGS_FILE    (also under torchrun)
"""

import sys

from tests.runtime import device_stubs

if __name__ == "__main__":  # dist checkpointing spawns helper processes that re-import this module
    device_stubs.install(sys.argv[1])
    from dpoc.runtime import train

    sys.exit(train.main(sys.argv[2:]))
