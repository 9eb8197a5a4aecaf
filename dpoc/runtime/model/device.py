"""The one place that knows which accelerator runs the job: npu (torch_npu + HCCL), cuda (NCCL) or cpu (gloo).

megatron-core has no device abstraction: it hard-codes `device="cuda"`, `torch.cuda.current_device()`, CUDA
RNG states, streams and a CUDA tensor-type check. On cpu, `_CpuBridge` maps exactly those assumptions onto
the CPU (each has a test in tests/runtime/test_runtime_device.py). On npu, torch_npu's `transfer_to_npu`
answers most of them and `_NpuPatches` the two it leaves (the RNG states, the tensor type names); dpoc does
not load MindSpeed's megatron adaptor (docs/devices.md says why). On cuda nothing is patched.

Every optional kernel is chosen here, per device, from the tables in `dpoc/contract/kernels.py` (the compiler
reads them too): core attention (`ATTENTION`), the MoE experts (`EXPERTS`), the fused norm, rotary embedding
and SwiGLU (`FUSED`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from dpoc.common import deferred_fusions
from dpoc.contract.errors import DpocError, Problem
from dpoc.contract.kernels import ATTENTION, EXPERTS

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" | "cuda" | "npu"
    backend: str  # torch.distributed backend
    experts: str = "sequential"  # the MoE experts kernel (`EXPERTS`)

    def current(self) -> torch.device:
        """Where this process's tensors live (set from LOCAL_RANK at start)."""
        return current(self.kind)

    def synchronize(self) -> None:
        """Wait for queued kernels, so wall-clock step times are real."""
        if self.kind != "cpu":
            getattr(torch, self.kind).synchronize()

    def peak_memory(self) -> int:
        """The most bytes this process's device held in tensors so far (0 on the cpu, where torch keeps no count)."""
        return 0 if self.kind == "cpu" else getattr(torch, self.kind).max_memory_allocated()

    def reset_peak_memory(self) -> None:
        """Start `peak_memory`'s count again from what the device holds now."""
        if self.kind != "cpu":
            getattr(torch, self.kind).reset_peak_memory_stats()

    def rng_state(self) -> torch.Tensor | None:
        """The accelerator's default generator, for checkpoints (the cpu's is torch's own: None here)."""
        return None if self.kind == "cpu" else getattr(torch, self.kind).get_rng_state()

    def set_rng_state(self, state: torch.Tensor | None) -> None:
        if state is not None and self.kind != "cpu":
            getattr(torch, self.kind).set_rng_state(state)


def current(kind: str) -> torch.device:
    """Where this process's tensors, and every tensor it hands to a collective, live on a `kind` device."""
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind, getattr(torch, kind).current_device())


def select(kind: str, backend: str, args_file: str = "megatron.args", attention: str = "auto") -> Device:
    """Check that `kind` is usable here, that `backend` fits it and that it runs the requested core-attention
    kernel; on cpu, install the megatron bridge."""
    expected = BACKENDS[kind]
    if backend != expected:
        raise DpocError([Problem(args_file, "--distributed-backend",
                                 f"{backend} does not drive --dpoc-device {kind} (valid: {expected})")])
    if kind == "npu":
        _import_torch_npu(args_file)
        _NpuPatches.install()
    elif kind == "cuda" and not torch.cuda.is_available():
        raise DpocError([Problem(args_file, "--dpoc-device",
                                 "cuda requested but torch sees no CUDA device "
                                 f"(torch {torch.__version__}; valid here: cpu)")])
    elif kind == "cpu":
        _CpuBridge.install()
        deferred_fusions.run_eagerly()
    attention_kernel(kind, attention, args_file)  # an unknown kernel fails here, before any process waits
    return Device(kind, backend, experts=experts_kernel(kind))


def experts_kernel(kind: str, requested: str | None = None) -> str:
    """The MoE experts kernel `kind` runs: `requested` (the Plan's `--dpoc-moe-experts`, one of `EXPERTS[kind]`:
    check_supported refuses others), else the device's first. A GPU whose torch lacks `torch._grouped_mm` loops
    over the experts, and says so once."""
    wanted = EXPERTS[kind][EXPERTS[kind].index(requested):] if requested else EXPERTS[kind]
    kernel = next(k for k in wanted if k != "torch-grouped-mm" or hasattr(torch, "_grouped_mm"))
    if kernel == "sequential" and wanted[0] != "sequential":
        warnings.warn(f"torch {torch.__version__} has no grouped GEMM (torch._grouped_mm): MoE experts on {kind} "
                      "run one at a time (megatron-core's SequentialMLP)", stacklevel=2)
    return kernel


def attention_kernel(kind: str, requested: str, args_file: str = "megatron.args") -> str:
    """The core-attention kernel `kind` runs: the requested one if this device has it, else an error."""
    available = [k for k in ATTENTION[kind] if k != "te" or importlib.util.find_spec("transformer_engine")]
    if requested == "auto":
        return available[0]
    if requested not in available:
        raise DpocError([Problem(args_file, "--dpoc-core-attention",
                                 f"{requested} does not run on --dpoc-device {kind} here "
                                 f"(valid: auto, {', '.join(available)})")])
    return requested


def _import_torch_npu(args_file: str) -> types.ModuleType:
    """torch_npu is imported only when a recipe asks for Ascend; say what is missing when it cannot load."""
    try:
        module = importlib.import_module("torch_npu")
        # Ascend's own bridge (as MindSpeed uses it): torch.cuda.* calls in megatron-core go to the NPU
        importlib.import_module("torch_npu.contrib.transfer_to_npu")
        return module
    except ImportError as exc:  # missing package, or CANN libraries (libhccl.so, ...) not on the path
        raise DpocError([Problem(
            args_file, "--dpoc-device",
            f"npu requested but torch_npu cannot be imported ({exc}); install torch_npu matching torch "
            f"{torch.__version__} (the `npu` extra) and source CANN's set_env.sh "
            "(/usr/local/Ascend/ascend-toolkit/set_env.sh) before launching (valid here: cpu)")]) from exc


@contextlib.contextmanager
def running_on(device: Device) -> Iterator[None]:
    """Everything megatron-core does for the job runs inside this context (a no-op except on cpu)."""
    if device.kind != "cpu":
        yield
        return
    with _CudaToCpu():
        yield


class _CudaToCpu(TorchFunctionMode):
    """Tensor factories that name a CUDA device (or a bare integer device index) get the CPU, and no pinned
    memory (a CUDA allocator; megatron-core's rotary embedding asks for it under context parallelism).

    Function modes are not active during autograd's backward; allocations there go through
    `torch.cuda.current_device()`, which the bridge maps to the CPU device.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _cpu_if_cuda(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


def _cpu_if_cuda(device: object) -> object:
    if isinstance(device, int) and not isinstance(device, bool):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _InertStream:
    """A stream that is also its own event: the CPU executes eagerly, so the MoE dispatcher's waits,
    recorded events and synchronisations have nothing to wait for."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other: object) -> None:
        pass

    def record_event(self) -> _InertStream:
        return self

    def synchronize(self) -> None:
        pass


class _CpuBridge:
    """megatron-core's CUDA assumptions, answered by the CPU. Installed once per process, cpu only."""

    installed = False

    @classmethod
    def install(cls) -> None:
        if cls.installed:
            return
        cls._rng()
        cls._runtime()
        _report_cuda_type_names("torch.")
        cls._moe_split_sizes()
        cls._uneven_collectives()
        cls._tensor_to_cuda()
        cls.installed = True

    @staticmethod
    def _rng() -> None:
        """megatron's RNG tracker saves/forks 'CUDA' RNG states: use the CPU generator's."""
        _route_rng_states(torch)
        torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
        torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)

    @staticmethod
    def _runtime() -> None:
        """The current device (allocations inside backward), synchronisation (pipeline shape exchange) and
        streams (MoE dispatcher)."""
        cpu = torch.device("cpu")
        torch.cuda.current_device = lambda: cpu
        torch.cuda.synchronize = lambda *a, **k: None
        torch.cuda.Stream = _InertStream
        torch.cuda.current_stream = lambda *a, **k: _InertStream()

    @staticmethod
    def _tensor_to_cuda() -> None:
        """`Tensor.cuda()` keeps the tensor where it is: the distributed optimizer moves its state to the device
        before gathering it for a fully reshardable checkpoint, and tied embeddings at pp>1 move the last
        stage's copy of the word embeddings (language_module.setup_embeddings_and_output_layer)."""
        torch.Tensor.cuda = lambda self, *args, **kwargs: self

    @staticmethod
    def _moe_split_sizes() -> None:
        """The alltoall dispatcher turns split-size tensors into numpy only when they are on CUDA, and
        gloo's all_to_all_single rejects tensor split sizes."""
        from megatron.core.transformer.moe import moe_utils, token_dispatcher

        def to_host(tensor, as_numpy=False, record_stream=False):
            if torch.is_tensor(tensor) and as_numpy:
                return tensor.numpy()
            return tensor

        moe_utils.maybe_move_tensor_to_cpu = to_host
        token_dispatcher.maybe_move_tensor_to_cpu = to_host


    @staticmethod
    def _uneven_collectives() -> None:
        """Expert-tensor parallelism gathers and reduce-scatters token blocks of different sizes per rank;
        gloo accepts neither uneven all_gather lists nor reduce_scatter. Pad to the largest block."""
        all_gather = dist.all_gather

        def gather(tensor_list, tensor, group=None, async_op=False):
            sizes = [t.shape[0] for t in tensor_list]
            if len(set(sizes)) == 1 or async_op:
                return all_gather(tensor_list, tensor, group=group, async_op=async_op)
            blocks = [tensor.new_empty((max(sizes), *tensor.shape[1:])) for _ in sizes]
            all_gather(blocks, _padded(tensor, max(sizes)), group=group)
            for out, block, size in zip(tensor_list, blocks, sizes, strict=True):
                out.copy_(block[:size])
            return None

        def reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
            longest = max(t.shape[0] for t in input_list)
            stacked = torch.stack([_padded(t, longest) for t in input_list])
            dist.all_reduce(stacked, op=op, group=group)
            output.copy_(stacked[dist.get_rank(group)][: output.shape[0]])
            return None

        dist.all_gather = gather
        dist.reduce_scatter = reduce_scatter



class _NpuPatches:
    """What `transfer_to_npu` leaves to megatron-core on npu: it copies only the names in
    `torch_npu.npu.__all__` onto torch.cuda, and `default_generators` (which megatron's RNG tracker indexes)
    is not one of them; NPU tensors report `torch.npu.*` type names, which megatron's optimizers refuse. The
    fused rotary embedding goes in here too: megatron's attention reaches it by a module-level name."""

    installed = False

    @classmethod
    def install(cls) -> None:
        if not cls.installed:
            from dpoc.runtime.model import fused

            _route_rng_states(torch.npu)
            _report_cuda_type_names("torch.npu.")
            fused.install_rotary()
            cls.installed = True


def _route_rng_states(generators: types.ModuleType) -> None:
    """megatron's RNG tracker reads and sets the 'CUDA' RNG state through two helpers: point them at
    `generators` (torch for the CPU, torch.npu), whose get_rng_state/set_rng_state need no device index."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: generators.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: generators.set_rng_state(state)


def _report_cuda_type_names(prefix: str) -> None:
    """megatron's optimizers and clip_grads compare `Tensor.type()` with `torch.cuda.*Tensor` names: report
    those for this device's tensors (names starting with `prefix`: `torch.` on the CPU, `torch.npu.`)."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is not None or kwargs:
            return original(self, dtype, non_blocking, **kwargs)
        name = original(self)  # under a function mode this re-enters the wrapper: rename once
        return name if name.startswith("torch.cuda.") else name.replace(prefix, "torch.cuda.", 1)

    torch.Tensor.type = type_


def _padded(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor.contiguous()
    out = tensor.new_zeros((rows, *tensor.shape[1:]))
    out[: tensor.shape[0]] = tensor
    return out


def fill_megatron_gaps() -> None:
    """megatron-core 0.16.1 refers to `te_general_gemm` in the MoE router even without TransformerEngine
    (NameError on any device); define the name as absent, which is what the router then checks for. Its
    gradient norm without apex or TE waits on the device once per gradient tensor: `gradient_l2_norm` instead."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = gradient_l2_norm


def gradient_l2_norm(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list[list[torch.Tensor]],
                     per_tensor: bool, *args: object) -> tuple[torch.Tensor, None]:
    """megatron's fallback `local_multi_tensor_l2_norm` (the norm of the tensors' norms, a [1] float32 tensor),
    kept on the device: it turns each tensor's norm into a Python number (one device-to-host wait per tensor,
    thousands a step with 128 experts); here the norms stay tensors and nothing is read back."""
    norms = [norm for tensors in tensor_lists if tensors for norm in torch._foreach_norm(tensors)]
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None
