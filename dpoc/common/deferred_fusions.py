"""megatron-core's fused kernels compiled on their first call, not when megatron-core is imported.

`megatron.core.jit` sets `jit_fuser = torch.compile`, and megatron-core's package imports modules that decorate
functions with it, so every process that imports megatron-core used to import TorchDynamo and Inductor first:
about 3 of its 7 seconds of start on this machine, in every rank, every converter and every precompute pass,
although a CPU run never calls one of those functions (its fusions are off). Installed by the runtime package
when first imported, before any of its modules imports megatron-core, and by the dataset writer and reader
(`dpoc.data.pairwise`) before theirs; the hook then wraps `jit_fuser` as its module loads, so each fused
function is the same `torch.compile` of the same function, made when first called.

On cpu the runtime has no kernel fusions (`runtime/model/gpt.py`), and `run_eagerly()` extends that to the
functions megatron-core calls through `jit_fuser` whatever its fusion flags say (the MoE router's
`_apply_expert_bias` on every routing): compiling it cost every CPU MoE rank seconds of TorchDynamo and Inductor
at its first step (28 s on a loaded 2-core machine) for a function that updates one counter.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
from collections.abc import Callable
from typing import Any

JIT_MODULE = "megatron.core.jit"
_eager = False


def run_eagerly() -> None:
    """From now on every deferred function in this process runs as written, never compiled."""
    global _eager
    _eager = True


def deferred(fuser: Callable[[Callable], Callable]) -> Callable[[Callable], Callable]:
    """A decorator like `fuser` that applies `fuser` to a function when the function is first called."""
    def decorate(function: Callable) -> Callable:
        compiled: Callable | None = None

        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if _eager:
                return function(*args, **kwargs)
            if compiled is None:
                compiled = fuser(function)
            return compiled(*args, **kwargs)
        return call

    decorate.fuser = fuser  # type: ignore[attr-defined]
    return decorate


class _JitHook(importlib.abc.MetaPathFinder):
    """Finds `megatron.core.jit` as the other finders do, and defers its `jit_fuser` once the module has run."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != JIT_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = next((s for s in (f.find_spec(name, path, target) for f in sys.meta_path if hasattr(f, "find_spec"))
                     if s is not None), None)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            module.jit_fuser = deferred(module.jit_fuser)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Defer megatron-core's fusions in this process, unless megatron-core's jit module already ran here."""
    if JIT_MODULE not in sys.modules and not any(isinstance(f, _JitHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _JitHook())
