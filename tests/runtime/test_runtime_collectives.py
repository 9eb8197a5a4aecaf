"""The planner counts the collectives the runtime really issues: the tiny recipe, compiled at dp2, tp2 and pp2
on 2 gloo processes, runs 3 steps under `collectives_probe` (torch.distributed's primitives wrapped); each
rank's calls in step 2 on groups of 2 or more ranks equal `collectives`' count for its pipeline stage, call for
call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpoc.compiler.pipeline import plan_recipe
from dpoc.compiler.render.targets import dpoc_runtime
from dpoc.contract.megatron_args import format_args
from dpoc.planner import collectives
from dpoc.planner.params import real_layers_per_stage, stage_shard
from dpoc.planner.workload import DPO_LIVE
from tests.runtime.batched import Runs
from tests.runtime.synthetic import write_pairs

ROOT = Path(__file__).resolve().parents[2]
STEP = 2  # the first step after the first: nothing lazily set up
LAYOUTS = {"dp2": [], "tp2": ["parallelism.tp=2"], "pp2": ["parallelism.pp=2"]}


def _plan(tmp: Path, overrides: list[str]):
    return plan_recipe(ROOT / "recipes" / "tiny_cpu.yaml",
                       ["hardware.devices_per_node=2", "training.train_iters=3", "training.warmup_iters=0",
                        f"run_dir={tmp / 'run'}", *overrides])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Runs]:
    """Each layout's run under the probe, all in one 2-process launch."""
    work = tmp_path_factory.mktemp("collectives")
    runs = Runs(work / "launches")
    for name, overrides in LAYOUTS.items():
        tmp = work / name
        tmp.mkdir()
        replaced = {"--data-path": write_pairs(tmp / "pairs", pairs=32)}
        args = [(flag, replaced.get(flag, value))
                for flag, value in dpoc_runtime.megatron_args(_plan(tmp, overrides), resume=False)]
        args_file = tmp / f"{name}.args"
        args_file.write_text(format_args(args))
        runs.add(name, ["-m", "tests.runtime.collectives_probe", tmp / "calls", f"@{args_file}"], 2)
    return work, runs


def counted(work: Path, runs: Runs, name: str) -> tuple[object, list[list[dict]]]:
    done = runs.result(name)
    assert done.returncode == 0, done.stderr[-4000:]
    tmp = work / name
    return _plan(tmp, LAYOUTS[name]), [json.loads((tmp / "calls" / f"rank-{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYOUTS)
def test_planner_counts_every_collective_of_a_step(runs, name):
    plan, ranks = counted(*runs, name)
    layout, model = plan.layout, plan.model
    layers = real_layers_per_stage(layout)
    for rank, calls in enumerate(ranks):
        stage = rank // (layout.world_size // layout.pp)  # pp outermost
        issued = [c for c in calls if c["step"] == STEP and c["group"] > 1]
        shard = stage_shard(model, layout, stage, layers[stage])
        per_micro_batch = collectives.micro_batch_calls(model, layout, DPO_LIVE, stage, layers[stage],
                                                        plan.hardware.backend)
        predicted = (layout.num_microbatches * per_micro_batch.total
                     + collectives.step_calls(model, layout, shard.dense, shard.experts))
        assert len(issued) == predicted, (rank, [(c["op"], c["bytes"]) for c in issued])
