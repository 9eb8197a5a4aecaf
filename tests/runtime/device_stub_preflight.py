"""`dpoc preflight BUILD --device` on the npu or cuda stand-in (device_stubs.py), for test_device_check.py;
with KERNEL, that stand-in kernel is broken first (its result off by 10%: `torch_npu.<name>`, or
`torch._grouped_mm`), so the check must name the op that runs it:

    python tests/runtime/device_stub_preflight.py KIND BUILD [KERNEL]

And one process of the check's group on the stand-in, for test_device_stubs.py's launches (batch_driver.py
runs `main(argv)` in each rank: the stand-in lives in those processes, which a group the preflight started
would not have):

    python -m tests.runtime.device_stub_preflight KIND ARGS_FILE REPORT_DIR DEVICES
"""

import os
import sys

from tests.runtime import device_stubs


def break_kernel(name: str) -> None:
    """Replace the stand-in kernel `name` by one whose first output is 10% too large."""
    import torch

    owner = torch if name == "_grouped_mm" else sys.modules["torch_npu"]
    original = getattr(owner, name)

    def broken(*args, **kwargs):
        out = original(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out * 1.1
        return type(out)([out[0] * 1.1, *out[1:]])

    setattr(owner, name, broken)


def main(argv: list[str]) -> int:
    """Install the stand-in (once per process) and run this rank's part of the check, reporting to REPORT_DIR."""
    kind, args_file, report, node_devices = argv
    if device_stubs.installed != [kind]:
        device_stubs.install(kind)
    from dpoc.contract.check_group import REPORT_ENV
    from dpoc.runtime import device_check

    os.environ[REPORT_ENV] = report
    return device_check.main([args_file, "--devices", node_devices])


if __name__ == "__main__":  # dist checkpointing spawns helper processes that re-import this module
    device_stubs.install(sys.argv[1])
    if len(sys.argv) > 3:
        break_kernel(sys.argv[3])
    from dpoc.cli import main

    sys.exit(main(["preflight", sys.argv[2], "--device"]))
