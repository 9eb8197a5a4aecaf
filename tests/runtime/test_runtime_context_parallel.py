"""Context parallelism: the load-balanced split, its causal blocks, and the SDPA and npu_fusion_attention
(documented semantics, on the CPU) attentions over a CP group of 2 processes equal to one process's attention
over whole sequences (forward and q/k/v gradients, padded rows and packed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpoc.common.ports import free_port
from dpoc.runtime.model.context_parallel import ContextShard, chunk_positions, padding_multiple

ROOT = Path(__file__).resolve().parents[2]


def test_rank_k_holds_chunks_k_and_2cp_minus_1_minus_k():
    assert chunk_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert chunk_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert chunk_positions(16, 4, 1).tolist() == [2, 3, 12, 13]
    with pytest.raises(ValueError, match="a sequence of 10 tokens cannot be split into 2·cp = 4 chunks"):
        chunk_positions(10, 2, 0)
    assert padding_multiple(tp=2, cp=2) == 8 and padding_multiple(tp=2, cp=1) == 2


def test_a_packed_stream_is_split_per_sequence_and_put_back_in_order():
    shards = [ContextShard((4, 8), cp=2, rank=r) for r in (0, 1)]
    assert shards[0].index.tolist() == [0, 3, 4, 5, 10, 11]
    assert shards[1].index.tolist() == [1, 2, 6, 7, 8, 9]
    laid_end_to_end = [i for s in shards for i in s.index.tolist()]
    assert [laid_end_to_end[i] for i in shards[0].order.tolist()] == list(range(12))


def test_each_chunk_attends_its_sequence_up_to_its_own_end():
    shard = ContextShard((8, 12, 4), cp=2, rank=1)  # chunks 2, 3, 1 long; rank 1 holds chunks 1 and 2
    assert [(q.start, q.stop, kv.start, kv.stop) for q, kv in shard.blocks(2)] == [
        (0, 2, 0, 4), (2, 4, 0, 6), (4, 7, 8, 14), (7, 10, 8, 17)]


@pytest.mark.slow
def test_attention_over_a_cp_group_equals_whole_sequence_attention():
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", str(Path(__file__).with_name("context_parallel_probe.py"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rank0_positions"] == [0, 1, 6, 7]
    for kernel in ("sdpa", "npu-fusion"):
        for form in ("padded", "packed"):
            assert set(result[kernel][form]) == {"out", "dq", "dk", "dv"}
            for name, error in result[kernel][form].items():
                assert error < 1e-5, (kernel, form, name, error)
