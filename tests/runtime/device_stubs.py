"""Stand-ins for an Ascend NPU (torch_npu, its `transfer_to_npu` bridge, HCCL) and a CUDA GPU (NCCL), running on
the CPU, so the runtime's npu and cuda paths execute here. Each piece follows the documented (or, where noted,
read-from-source) behaviour of the real thing, including the parts that break megatron-core:

- `transfer_to_npu` copies only the names in `torch_npu.npu.__all__` onto `torch.cuda`; `default_generators`
  is not among them, so `torch.cuda.default_generators` stays the CPU build's empty tuple.
- NPU tensors report `torch.npu.FloatTensor` / `torch.npu.BFloat16Tensor` from `Tensor.type()`; CUDA ones
  `torch.cuda.*`.
- A process group on hccl or nccl has no CPU backend: a collective on a host tensor raises `RuntimeError: No
  backend type associated with device type cpu` (what torch says for a cuda-only group, `cuda:gloo`).
- the kernels the runtime calls (`npu_fusion_attention`, `npu_grouped_matmul`, `npu_rms_norm`,
  `npu_rotary_mul`, `npu_swiglu`) compute what the Ascend PyTorch API reference says they compute.

The device's memory is the CPU's: tensor factories naming the accelerator ("npu", "cuda", an index) allocate
on the CPU, and pinned host memory (which the accelerator's runtime provides) is plain. A tensor made by a factory without a device is a host tensor (marked), as it would be on a real
machine; tensors derived from it by arithmetic are not tracked, so the collective check catches tensors made
on the host and handed straight to a collective (the defect it exists for), not every possible one.
torch.compile (megatron-core's `jit_fuser`) is off: it would compile for a device that is not there.
Transport is gloo underneath, so the CPU bridge's two gloo-only adaptations (MoE split sizes, uneven
all-gather) are applied beneath the stub; nothing else of the bridge is.

Usage (in a fresh process, before dpoc.runtime selects the device): `install("npu")` or `install("cuda")`.
"""

from __future__ import annotations

import contextlib
import sys
import types

import torch
import torch.distributed as dist
from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
from torch.autograd.graph import _engine_run_backward
from torch.overrides import TorchFunctionMode

HOST = "_dpoc_stub_host"  # attribute marking a tensor made on the host
NO_CPU_BACKEND = "No backend type associated with device type cpu"
# torch_npu.npu.__all__ as far as megatron-core and dpoc reach through torch.cuda: no default_generators
NPU_ALL = ("is_available", "is_initialized", "device_count", "current_device", "set_device", "synchronize", "get_rng_state",
           "set_rng_state", "manual_seed", "manual_seed_all", "Stream", "Event", "current_stream",
           "stream", "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats", "empty_cache")
FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.as_tensor}
MOVES = {torch.Tensor.to, torch.Tensor.cuda, getattr(torch.Tensor, "npu", None)} - {None}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter",
               "broadcast", "all_to_all_single", "reduce", "send", "recv", "isend", "irecv")
installed: list[str] = []


class _Stream:
    """A stream that is also its own event: the stand-in device executes eagerly."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other: object) -> None:
        pass

    def wait_event(self, event: object) -> None:
        pass

    def record_event(self, event: object = None) -> _Stream:
        return self

    def record(self, stream: object = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _accelerator() -> dict[str, object]:
    """The device API both stand-ins share: one initialised device, index 0, whose generator is the CPU's."""
    return {
        "is_available": lambda: True, "is_initialized": lambda: True, "device_count": lambda: 1,
        "current_device": lambda: 0,
        "set_device": lambda device: None, "synchronize": lambda *a, **k: None,
        "get_rng_state": lambda *a, **k: torch.get_rng_state(),
        "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state),
        "manual_seed": lambda seed: torch.default_generator.manual_seed(seed),
        "manual_seed_all": lambda seed: torch.default_generator.manual_seed(seed),
        "Stream": _Stream, "Event": _Stream, "current_stream": lambda *a, **k: _Stream(),
        "stream": lambda stream=None: contextlib.nullcontext(stream),
        "memory_allocated": lambda *a, **k: 0, "max_memory_allocated": lambda *a, **k: 0,
        "reset_peak_memory_stats": lambda *a, **k: None, "empty_cache": lambda: None,
    }


def _on_device(device: object) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.split(":")[0] in ("cuda", "npu")
    return isinstance(device, torch.device) and device.type in ("cuda", "npu")


class _DeviceMemory(TorchFunctionMode):
    """Tensors placed on the accelerator live on the CPU; factories without a device make host tensors. The
    mode stays active through backward (megatron-core allocates there on `torch.cuda.current_device()`):
    a function mode is suspended while it handles a call, so backward is run from here with it re-entered."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.backward:
            return self._backward(args[0], *args[1:], **kwargs)
        if func is torch.autograd.backward:
            return self._backward(*args, **{"grad_tensors" if k == "gradient" else k: v for k, v in kwargs.items()})
        if _on_device(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
        if kwargs.get("pin_memory"):  # the accelerator's host allocator pins; this CPU build has none
            kwargs["pin_memory"] = False
        if func in MOVES:
            return _moved(func, args, kwargs)
        out = func(*args, **kwargs)
        if func in FACTORIES and kwargs.get("device") is None:
            setattr(out, HOST, True)
        return out


    def _backward(self, tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None,
                  gradient=None, **_: object) -> None:
        tensors = _tensor_or_tensors_to_tuple(tensors, None)
        given = grad_tensors if grad_tensors is not None else gradient
        grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(given, len(tensors)), is_grads_batched=False)
        inputs = () if inputs is None else (inputs,) if torch.is_tensor(inputs) else tuple(inputs)
        with self:
            _engine_run_backward(tensors, grads, create_graph if retain_graph is None else retain_graph,
                                 create_graph, inputs, allow_unreachable=True, accumulate_grad=True)


def _moved(func, args: tuple, kwargs: dict) -> torch.Tensor:
    """`.to(device)`, `.cuda()`, `.npu()`: onto the accelerator is a fresh (unmarked) alias of the CPU data."""
    tensor, rest = args[0], list(args[1:])
    to_device = func is not torch.Tensor.to or _on_device(kwargs.get("device")) or any(map(_on_device, rest))
    rest = [torch.device("cpu") if _on_device(a) else a for a in rest]
    if func is not torch.Tensor.to:
        rest, kwargs = [], {}
    out = torch.Tensor.to(tensor, *rest, **kwargs)
    if to_device and out is tensor:
        out = tensor.view_as(tensor)
    return out


def _type_names(prefix: str) -> None:
    """Device tensors report `<prefix>FloatTensor`, host tensors the plain `torch.FloatTensor`."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is not None or kwargs:
            return original(self, dtype, non_blocking, **kwargs)
        name = original(self)
        if getattr(self, HOST, False) or name.startswith(("torch.cuda.", "torch.npu.")):
            return name
        return name.replace("torch.", prefix, 1)

    torch.Tensor.type = type_


def _groups_without_cpu_backend() -> None:
    """hccl/nccl groups (gloo underneath) that refuse host tensors, as torch does for a cuda-only group."""
    init = dist.init_process_group

    def init_process_group(backend=None, *args, **kwargs):
        return init("gloo" if backend in ("hccl", "nccl") else backend, *args, **kwargs)

    dist.init_process_group = init_process_group
    for name in COLLECTIVES:
        setattr(dist, name, _refusing_host_tensors(getattr(dist, name)))


def _refusing_host_tensors(collective):
    def checked(*args, **kwargs):
        for value in (*args, *kwargs.values()):
            for tensor in value if isinstance(value, (list, tuple)) else (value,):
                if torch.is_tensor(tensor) and getattr(tensor, HOST, False):
                    raise RuntimeError(NO_CPU_BACKEND)
        return collective(*args, **kwargs)

    return checked


def _gloo_transport() -> None:
    from dpoc.runtime.model.device import _CpuBridge

    _CpuBridge._moe_split_sizes()
    _CpuBridge._uneven_collectives()


def install(kind: str) -> None:
    """Make this process look like a node with one `kind` device (npu or cuda); once per process."""
    assert not installed, installed
    installed.append(kind)
    torch._dynamo.config.disable = True  # megatron's jit_fuser compiles for the real device, not this one
    _gloo_transport()
    _groups_without_cpu_backend()
    if kind == "npu":
        _install_torch_npu()
    else:
        _install_cuda()


def _install_cuda() -> None:
    """torch.cuda as on a GPU node: one initialised device whose default generator megatron-core indexes."""
    for name, value in _accelerator().items():
        setattr(torch.cuda, name, value)
    torch.cuda.default_generators = (torch.default_generator,)
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    _type_names("torch.cuda.")
    _DeviceMemory().__enter__()


def _install_torch_npu() -> None:
    """A `torch_npu` package whose `contrib.transfer_to_npu` import does what Ascend's does (copies
    `torch_npu.npu.__all__` onto torch.cuda), with the kernels of `npu_kernels`."""
    from tests.runtime import npu_kernels

    torch.utils.rename_privateuse1_backend("npu")
    npu = types.ModuleType("torch_npu.npu")
    for name, value in _accelerator().items():
        setattr(npu, name, value)
    npu.__all__ = list(NPU_ALL)
    package = types.ModuleType("torch_npu")
    package.npu = npu
    package.__path__ = []
    for name in npu_kernels.KERNELS:
        setattr(package, name, getattr(npu_kernels, name))
    contrib = types.ModuleType("torch_npu.contrib")
    contrib.__path__ = []
    bridge = types.ModuleType("torch_npu.contrib.transfer_to_npu")
    sys.modules.update({"torch_npu": package, "torch_npu.npu": npu, "torch_npu.contrib": contrib})
    torch.npu = npu
    _type_names("torch.npu.")
    _DeviceMemory().__enter__()

    def transfer() -> None:
        for name in npu.__all__:
            setattr(torch.cuda, name, getattr(npu, name))

    transfer()  # runs at import in the real package; the stand-in module is registered already imported
    sys.modules["torch_npu.contrib.transfer_to_npu"] = bridge
