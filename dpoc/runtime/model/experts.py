"""MoE experts as two grouped GEMMs over this rank's local experts, instead of SequentialMLP's loop of one small
MLP per expert (`device.EXPERTS` picks the kernel per device; docs/devices.md says why).

megatron-core's own grouped experts do not fit: `GroupedMLP` needs the CUDA-only `grouped_gemm` package (none
exists for Ascend) and `TEGroupedMLP` needs TransformerEngine. `GroupedExperts` keeps SequentialMLP's modules
and weights, so checkpoints, the Hugging Face mapping and the seeded init see the same tensors whichever
kernel runs; only the forward differs: the local experts' fc1 and fc2 weights are stacked ([experts, out, in],
one copy per forward, whose backward hands each expert its gradient) and each token block is multiplied by
its expert's weights in one kernel call. Expert linears never communicate (megatron's dispatcher moves the
tokens), so the GEMMs on the local shards are the whole computation, at any tp/ep/etp. Under LoRA with
`--dpoc-lora-experts` each projection adds its experts' adapters, A and B stacked the same way and run through
the same kernel (`lora.grouped_adapter`: one adapter per expert, each token block through its expert's).

Kernels, y_i = x_i @ W_i^T for the rows x_i routed to local expert i (`tokens_per_expert[i]` rows each):
- `torch-grouped-mm`: `torch._grouped_mm(x, W^T, offs=cumulative row ends)` (cuda; differentiable in torch).
- `npu-gmm`: torch_npu's `npu_grouped_matmul` (split M with the group sizes, group_list_type 1); its backward
  is two more calls: dx splits M again against W, dW^T splits the reduction axis (group_type 2; skipped for a
  frozen weight).
"""

from __future__ import annotations

import functools

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from dpoc.runtime.model import lora

GROUP_SIZES = 1  # npu_grouped_matmul's group_list_type: group_list holds each group's size
SPLIT_M, SPLIT_K = 0, 2  # its group_type: split x's rows / split the reduction axis
ONE_OUTPUT = 3  # its split_item: one output tensor


def _torch_grouped(x: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    ends = counts.to(device=x.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return torch._grouped_mm(x, weights.transpose(1, 2), offs=ends)


class _NpuGroupedLinear(torch.autograd.Function):
    """y = x_i @ W_i^T per group through npu_grouped_matmul, with its backward in the same kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weights, counts)
        return _gmm(x, weights.transpose(1, 2), counts, SPLIT_M)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weights, counts = ctx.saved_tensors
        grad_x = _gmm(grad, weights, counts, SPLIT_M) if ctx.needs_input_grad[0] else None
        # [experts, in, out] -> [experts, out, in]; none for frozen weights (LoRA's base)
        grad_w = _gmm(x.t(), grad, counts, SPLIT_K).transpose(1, 2) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None


def _gmm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, group_type: int) -> torch.Tensor:
    import torch_npu

    return torch_npu.npu_grouped_matmul([x], [weight], group_list=counts, split_item=ONE_OUTPUT,
                                        group_type=group_type, group_list_type=GROUP_SIZES)[0]


def _npu_grouped(x: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return _NpuGroupedLinear.apply(x, weights, counts.to(device=x.device, dtype=torch.int64))


def _activation(config, x: torch.Tensor) -> torch.Tensor:
    """megatron's MLP activation (its unfused path): act(gate) * linear for a GLU, else act(x)."""
    if config.gated_linear_unit:
        gate, linear = torch.chunk(x, 2, dim=-1)
        return config.activation_func(gate) * linear
    return config.activation_func(x)


GROUPED = {"torch-grouped-mm": _torch_grouped, "npu-gmm": _npu_grouped}


@functools.cache
def experts_class(kernel: str) -> type[SequentialMLP]:
    """The experts module megatron's MoE spec builds for `kernel` (`device.EXPERTS` names them)."""
    if kernel == "sequential":
        return SequentialMLP
    return type(f"GroupedExperts[{kernel}]", (GroupedExperts,), {"kernel": kernel})


class GroupedExperts(SequentialMLP):
    """SequentialMLP's experts, computed with one grouped GEMM per projection (`kernel`, see the module
    docstring). Variants the grouped path does not cover (a clamped or offset GLU, biases, fp8/fp4, probs on
    the input) run SequentialMLP's loop."""

    kernel = "torch-grouped-mm"

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        config = self.config
        if (self.num_local_experts == 1 or config.add_bias_linear or config.fp8 or config.fp4
                or config.moe_apply_probs_on_input or config.activation_func_clamp_value is not None
                or config.glu_linear_offset):
            return super().forward(permuted_local_hidden_states, tokens_per_expert, permuted_probs)
        grouped = GROUPED[self.kernel]
        hidden = self._projection("linear_fc1", permuted_local_hidden_states, tokens_per_expert, grouped)
        # the activation module the spec gave the experts (a fused kernel, see gpt.block_spec), else megatron's
        hidden = self.local_experts[0].activation_func(hidden) if config.use_te_activation_func \
            else _activation(config, hidden)
        dtype = hidden.dtype
        hidden = (hidden * permuted_probs.unsqueeze(-1)).to(dtype)
        return self._projection("linear_fc2", hidden, tokens_per_expert, grouped), None

    def _projection(self, name: str, x: torch.Tensor, counts: torch.Tensor, grouped) -> torch.Tensor:
        """One projection of every local expert: its weights stacked, plus (LoRA) its adapters', in grouped GEMMs.
        fc2's input is split over the expert tp group like its weight's columns (`lora._row_forward`)."""
        linears = [getattr(e, name) for e in self.local_experts]
        out = grouped(x, torch.stack([linear.weight for linear in linears]), counts)
        delta = lora.grouped_adapter(linears, x, counts, grouped, sharded_input=name == "linear_fc2")
        return out if delta is None else out + delta
