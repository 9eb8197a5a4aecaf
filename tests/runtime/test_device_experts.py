"""The grouped-GEMM experts (dpoc/runtime/model/experts.py) equal megatron-core's SequentialMLP in fp32, loss
and every gradient, alone and at ep2, tp2 with expert-TP 2 (sequence parallel), and ep2 x tp2: torch's
grouped GEMM (the cuda kernel; torch runs it on the CPU too) and npu_grouped_matmul as documented
(npu_kernels.py), forward and the backward dpoc writes for it. With LoRA on the experts (one adapter per
expert, `--dpoc-lora-experts`), alone and at ep2: the same loss and every adapter's gradient, the base frozen.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.runtime.batched import Runs
from tests.runtime.synthetic import write_args, write_pairs
from tests.runtime.test_runtime_attention import relative_error
from tests.runtime.test_runtime_lora import EXPERTS

KERNELS = {"torch-grouped-mm": "GroupedExperts[torch-grouped-mm]", "npu-gmm": "GroupedExperts[npu-gmm]"}
LAYOUTS = {
    "one": (1, []),
    "ep2": (2, [("--expert-model-parallel-size", 2)]),
    "tp2-etp2-sp": (2, [("--tensor-model-parallel-size", 2), ("--expert-tensor-parallel-size", 2),
                        ("--sequence-parallel", True)]),
    "ep2xtp2-sp": (4, [("--expert-model-parallel-size", 2), ("--tensor-model-parallel-size", 2),
                       ("--sequence-parallel", True)]),
    "one-lora": (1, EXPERTS),
    "ep2-lora": (2, [("--expert-model-parallel-size", 2), *EXPERTS]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Runs]:
    """Each layout's probe, one launch per process count."""
    work = tmp_path_factory.mktemp("experts")
    pairs = write_pairs(work / "pairs", pairs=16)
    runs = Runs(work / "launches")
    for layout, (processes, flags) in LAYOUTS.items():
        (work / layout).mkdir()
        args = write_args(work / f"{layout}.args", pairs, work / "runs" / layout, moe=True, layout=flags,
                          extra=[("--moe-grouped-gemm", True)])
        runs.add(layout, ["-m", "tests.runtime.experts_probe", args, work / layout, "sequential", *KERNELS],
                 processes)
    return work, runs


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.slow
def test_grouped_experts_equal_sequential_mlp(runs, layout):
    work, runs = runs
    done = runs.result(layout)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((work / layout / f"rank{r}.json").read_text()) for r in range(LAYOUTS[layout][0])]
    for rank in ranks:
        reference = rank["sequential"]
        assert reference["experts"] == "SequentialMLP" and reference["loss"]
        assert any("local_experts" in name for name in reference["grads"])
        if layout.endswith("-lora"):  # only the adapters train: 4 layers x 4/ep local experts x (fc1, fc2) x (A, B)
            assert all(name.endswith(("lora_A", "lora_B")) for name in reference["grads"])
            assert len([n for n in reference["grads"] if "local_experts" in n]) == 4 * 4 // len(ranks) * 2 * 2
        for kernel, module in KERNELS.items():
            grouped = rank[kernel]
            assert grouped["experts"] == module
            assert grouped["loss"] == pytest.approx(reference["loss"], rel=1e-6), kernel
            assert set(grouped["grads"]) == set(reference["grads"])
            for name, grad in reference["grads"].items():
                assert relative_error(grad, grouped["grads"][name]) < 1e-5, (kernel, name)
                if "local_experts" in name:
                    assert any(grad), name  # every expert takes tokens, so the comparison means something
