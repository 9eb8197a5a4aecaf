"""The memory model agrees with the tensors of a real run of the runtime (CPU, fp32): static part within 2 %,
the bytes autograd saves for one micro-batch within 15 %.

Each case compiles the tiny recipe for a layout, runs the runtime for one step with `--dpoc-measure-memory`
(`bench/memory_vs_measured.py` has the full set of layouts and the activation comparison) and checks every
rank's weights, gradient buffers, optimizer state and reference weights against `estimate_memory`.
"""

from __future__ import annotations

import pytest

from bench.memory_vs_measured import ACTIVATION_TARGET, SEQ_LENGTH, STATIC_PARTS, STATIC_TARGET, compare
from dpoc.planner.lengths import LengthStats, parse_stats
from tests.conftest import MEMORY_PAIRS, measured_memory
from tests.runtime.synthetic import pair_stats


@pytest.fixture(scope="module")
def lengths() -> LengthStats:
    return parse_stats(pair_stats(MEMORY_PAIRS, SEQ_LENGTH), "synthetic")


@pytest.mark.parametrize("layout", ["single", "tp2-sp", "single-packed", "single-lora", "tp2-sp-lora"])
@pytest.mark.slow
def test_memory_matches_the_runtime_tensors(lengths, layout):
    plan, ranks = measured_memory(layout)
    rows = compare(plan, ranks, lengths)
    assert [row["rank"] for row in rows] == list(range(plan.layout.world_size))
    for row in rows:
        assert row["params"] == row["predicted_params"], row
        for part in (*STATIC_PARTS, "static"):
            assert abs(row["error"][part]) <= STATIC_TARGET, (layout, row["rank"], part, row)
        assert abs(row["error"]["activations"]) <= ACTIVATION_TARGET, (layout, row["rank"], row)
