"""Shared helpers: the repository root, running the dpoc CLI in-process or as a real subprocess, the environment
rendered scripts run in, and the tiny dataset preprocessed once per session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path

import pytest

from dpoc.common import deferred_fusions
from dpoc.compiler.pipeline import build
from dpoc.contract.plan import Plan

deferred_fusions.install()  # test modules import megatron-core in this process too: no TorchDynamo for it either

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def dpoc_cli(capsys):
    """Run `dpoc ARGS` in this process (fast); returns exit code, stdout, stderr."""
    from dpoc.cli import main

    def run(*args: str) -> CliResult:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def run_subprocess(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "dpoc", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=120)


_TEMP = tempfile.TemporaryDirectory(prefix="dpoc-tests-")  # removed when the test session ends


# The node scripts' device check (`dpoc preflight BUILD --device`, ~8 CPU-seconds: torch and megatron-core
# imported, a layer run) is the subject of tests/runtime/test_device_check.py, its place in the node script of
# tests/compiler/test_build.py, and it runs in the end-to-end test's launch; a test about something else skips it.
NO_DEVICE_CHECK = {"DPOC_DEVICE_CHECK": "0"}


def script_env(**extra: str) -> dict[str, str]:
    """Rendered scripts find this checkout's dpoc and the venv's python/torchrun; one thread per gloo process."""
    return {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
            "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}


@cache
def tiny_dataset() -> str:
    """The tiny recipe's data, preprocessed once per session by its rendered preprocess.sh; the output prefix."""
    tmp = Path(_TEMP.name) / "data"
    out = tmp / "build"
    build(RECIPES / "tiny_cpu.yaml", [f"dataset.output_prefix={tmp}/orca_tiny"], out=out)
    pre = subprocess.run(["bash", str(out / "preprocess.sh")], cwd=REPO, env=script_env(), capture_output=True,
                         text=True, timeout=300)
    assert pre.returncode == 0, pre.stderr[-2000:]
    assert json.loads((tmp / "orca_tiny_stats.json").read_text())["pairs_kept"] == 256
    return str(tmp / "orca_tiny")


def scratch(name: str) -> Path:
    """A directory that lives as long as the session (for what cached helpers build)."""
    path = Path(_TEMP.name) / name
    path.mkdir(parents=True, exist_ok=True)
    return path



MEMORY_PAIRS = 16


@cache
def memory_pairs() -> str:
    """The synthetic pairwise dataset (16 pairs) the memory probes read, written once per session."""
    from tests.runtime.synthetic import write_pairs

    return write_pairs(scratch("memory") / "pairs", pairs=MEMORY_PAIRS)


@cache
def measured_memory(layout: str, *other: str) -> tuple[Plan, list[dict]]:
    """One step of the runtime with its memory probe (`bench/memory_vs_measured.measure`) for a layout of that
    bench plus recipe overrides: (the plan, each rank's counts). Cached for the session, so a run two tests
    read (the planner's `single` layout is the reference-free loss test's sigmoid case) runs once."""
    from bench.memory_vs_measured import LAYOUTS, compile_layout, measure

    preset, processes, parallelism, *extra = LAYOUTS[layout]
    plan = compile_layout(preset, processes, parallelism, other=[*(extra[0] if extra else []), *other])
    name = "_".join([layout, *other]).replace("/", "_")
    return plan, measure(plan, memory_pairs(), scratch("memory") / name)
