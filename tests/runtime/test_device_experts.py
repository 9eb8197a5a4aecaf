"""The grouped-GEMM experts (dpoc/runtime/model/experts.py) equal megatron-core's SequentialMLP in fp32, loss
and every gradient, alone and at ep2, tp2 with expert-TP 2 (sequence parallel), and ep2 x tp2: torch's
grouped GEMM (the cuda kernel; torch runs it on the CPU too) and npu_grouped_matmul as documented
(npu_kernels.py), forward and the backward dpoc writes for it.
"""

from __future__ import annotations

import json

import pytest

from dpoc.common.ports import free_port
from tests.runtime.synthetic import write_args, write_pairs
from tests.runtime.test_device_stubs import ROOT, run_python
from tests.runtime.test_runtime_attention import relative_error

KERNELS = {"torch-grouped-mm": "GroupedExperts[torch-grouped-mm]", "npu-gmm": "GroupedExperts[npu-gmm]"}
LAYOUTS = {
    "one": (1, []),
    "ep2": (2, [("--expert-model-parallel-size", 2)]),
    "tp2-etp2-sp": (2, [("--tensor-model-parallel-size", 2), ("--expert-tensor-parallel-size", 2),
                        ("--sequence-parallel", True)]),
    "ep2xtp2-sp": (4, [("--expert-model-parallel-size", 2), ("--tensor-model-parallel-size", 2),
                       ("--sequence-parallel", True)]),
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    return write_pairs(tmp_path_factory.mktemp("experts") / "pairs", pairs=16)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grouped_experts_equal_sequential_mlp(tmp_path, pairs, layout):
    processes, flags = LAYOUTS[layout]
    args = write_args(tmp_path / "e.args", pairs, tmp_path / "run", moe=True, layout=flags,
                      extra=[("--moe-grouped-gemm", True)])
    probe = str(ROOT / "tests" / "runtime" / "experts_probe.py")
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", f"--nproc-per-node={processes}",
                                          "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    done = run_python(*launcher, probe, str(args), str(tmp_path), "sequential", *KERNELS)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(processes)]
    for rank in ranks:
        reference = rank["sequential"]
        assert reference["experts"] == "SequentialMLP" and reference["loss"]
        assert any("local_experts" in name for name in reference["grads"])
        for kernel, module in KERNELS.items():
            grouped = rank[kernel]
            assert grouped["experts"] == module
            assert grouped["loss"] == pytest.approx(reference["loss"], rel=1e-6), kernel
            assert set(grouped["grads"]) == set(reference["grads"])
            for name, grad in reference["grads"].items():
                assert relative_error(grad, grouped["grads"][name]) < 1e-5, (kernel, name)
                if "local_experts" in name:
                    assert any(grad), name  # every expert takes tokens, so the comparison means something
