"""`dpoc preflight BUILD --device` on the npu or cuda stand-in (device_stubs.py), for test_device_check.py;
with KERNEL, that stand-in kernel is broken first (its result off by 10%: `torch_npu.<name>`, or
`torch._grouped_mm`, put back after), so the check must name the op that runs it:

    python -m tests.runtime.device_stub_preflight KIND preflight BUILD [KERNEL]

And one process of the check's group on the stand-in, for test_device_stubs.py's launches (the stand-in lives
in those processes, which a group the preflight started would not have):

    python -m tests.runtime.device_stub_preflight KIND rank ARGS_FILE REPORT_DIR DEVICES

batch_driver.py runs `main(argv)` for either, so one launch per kind holds all of that kind's checks.
"""

import os
import sys

from tests.runtime import device_stubs


def break_kernel(name: str):
    """Replace the stand-in kernel `name` by one whose first output is 10% too large; the function that puts
    the original back."""
    import torch

    owner = torch if name == "_grouped_mm" else sys.modules["torch_npu"]
    original = getattr(owner, name)

    def broken(*args, **kwargs):
        out = original(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out * 1.1
        return type(out)([out[0] * 1.1, *out[1:]])

    setattr(owner, name, broken)
    return lambda: setattr(owner, name, original)


def main(argv: list[str]) -> int:
    """Install the stand-in (once per process), then the preflight or this rank's part of the check."""
    kind, form, *rest = argv
    if device_stubs.installed != [kind]:
        device_stubs.install(kind)
    if form == "preflight":
        return _preflight(*rest)
    args_file, report, node_devices = rest
    from dpoc.contract.check_group import REPORT_ENV
    from dpoc.runtime import device_check

    os.environ[REPORT_ENV] = report
    return device_check.main([args_file, "--devices", node_devices])


def _preflight(build: str, kernel: str | None = None) -> int:
    from dpoc.cli import main as cli

    restore = break_kernel(kernel) if kernel else None
    try:
        return cli(["preflight", build, "--device"])
    finally:
        if restore is not None:
            restore()


if __name__ == "__main__":  # dist checkpointing spawns helper processes that re-import this module
    sys.exit(main(sys.argv[1:]))
