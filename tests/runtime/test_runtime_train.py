"""The runtime trains from a rendered megatron.args on CPU: every parallel layout gives the one-process
losses, and a run learns the synthetic preference.

Each run is `dpoc.runtime.train`'s `main(["@file"])` in one process or under torchrun (2 and 4 processes, gloo
on 127.0.0.1), reading indexed datasets written with megatron-core's IndexedDatasetBuilder. The module's runs
are declared once (`runs`) and launched together, one launch per process count (`tests/runtime/batched.py`).
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from tests.runtime.batched import ROOT, Runs, environment, launcher
from tests.runtime.synthetic import write_args, write_pairs

STEPS = 4
COMPARED = ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected",
            "rewards/margins", "rewards/accuracies", "grad_norm")

NO_AUX = [("--moe-aux-loss-coeff", 0.0)]
LAYOUTS = {  # name: (processes, layout flags, reference run)
    "tp2": (2, [("--tensor-model-parallel-size", 2)], "dense"),
    "tp2-sp": (2, [("--tensor-model-parallel-size", 2), ("--sequence-parallel", True)], "dense"),
    "pp2": (2, [("--pipeline-model-parallel-size", 2)], "dense"),
    "pp2-vpp2": (2, [("--pipeline-model-parallel-size", 2),
                     ("--num-layers-per-virtual-pipeline-stage", 1)], "dense"),
    "dp2": (2, [], "dense"),
    "ep2-moe": (2, [("--expert-model-parallel-size", 2)], "moe"),
    # context parallelism: each rank holds chunks k and 3-k of every sequence, keys and values gathered
    "cp2": (2, [("--context-parallel-size", 2)], "dense"),
    # 4 processes, and an uneven pipeline (MindSpeed's --num-layer-list) as megatron-core's stage layout
    "tp2xpp2-uneven": (4, [("--tensor-model-parallel-size", 2), ("--pipeline-model-parallel-size", 2),
                           ("--num-layer-list", "3,1")], "dense"),
    "tp2xcp2-sp": (4, [("--tensor-model-parallel-size", 2), ("--context-parallel-size", 2),
                       ("--sequence-parallel", True)], "dense"),
    "pp2xcp2": (4, [("--pipeline-model-parallel-size", 2), ("--context-parallel-size", 2)], "dense"),
    # the aux loss is computed over each CP rank's tokens, so off here (as for expert-TP below)
    "ep2xcp2-moe": (4, [("--expert-model-parallel-size", 2), ("--context-parallel-size", 2), *NO_AUX],
                    "moe-no-aux"),
    # expert-TP gathers uneven token blocks (gloo bridge). megatron's aux loss is computed per sequence
    # shard under sequence parallelism, so it is off here to compare with one process exactly
    "ep2xtp2-sp-moe": (4, [("--expert-model-parallel-size", 2), ("--tensor-model-parallel-size", 2),
                           ("--sequence-parallel", True), *NO_AUX], "moe-no-aux"),
}
# one loss per family besides sigmoid (the layouts above): ipo (paired, a reference), simpo (reference-free)
LOSSES = {"ipo": [("--dpo-loss-type", "ipo")],
          "simpo": [("--dpo-loss-type", "simpo"), ("--dpoc-reference", "none"), ("--dpoc-simpo-gamma", 0.5),
                    ("--dpoc-cpo-alpha", 0.1)]}
REFERENCE_RUNS = {"dense": dict(moe=False), "moe": dict(moe=True), "moe-no-aux": dict(moe=True, extra=NO_AUX),
                  **{loss: dict(extra=flags) for loss, flags in LOSSES.items()}}

# one loss per family on each layout it is compared at
LOSS_LAYOUTS = ("tp2", "pp2")
LEARN = dict(steps=20, lr=2e-3, warmup=3, min_lr=1e-4)


def train(args_file: Path, processes: int) -> subprocess.CompletedProcess:
    return run_module(["-m", "dpoc.runtime.train", f"@{args_file}"], processes)


def run_module(module: list[str], processes: int) -> subprocess.CompletedProcess:
    """`python -m ...` in one process, or under torchrun on 127.0.0.1 (gloo), one thread per process: a launch
    of its own (`batched.Runs` shares one between runs)."""
    return subprocess.run([*launcher(processes), *module], cwd=ROOT, env=environment(), capture_output=True,
                          text=True, timeout=600)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def args_file(tmp: Path, name: str, **kwargs) -> Path:
    """`name`'s megatron.args over the dataset `tmp/pairs`, its run directory `tmp/runs/name`."""
    return write_args(tmp / f"{name}.args", str(tmp / "pairs"), tmp / "runs" / name, **kwargs)


def declare(runs: Runs, tmp: Path, name: str, processes: int = 1, **kwargs) -> None:
    runs.add(name, ["-m", "dpoc.runtime.train", f"@{args_file(tmp, name, **kwargs)}"], processes)


def finished(runs: Runs, tmp: Path, name: str) -> list[dict]:
    """A declared run's metrics, once it has exited 0."""
    done = runs.result(name)
    assert done.returncode == 0, done.stderr[-4000:]
    return metrics(tmp / "runs" / name)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("runtime")
    write_pairs(tmp / "pairs", pairs=64)
    return tmp


@pytest.fixture(scope="module")
def runs(workdir) -> Runs:
    """Every run of this module: the one-process references, each layout, each loss family at tp2 and pp2, the
    learning run and the refused context-parallel run."""
    runs = Runs(workdir / "launches")
    for name, kwargs in REFERENCE_RUNS.items():
        declare(runs, workdir, f"single-{name}", steps=STEPS, **kwargs)
    for layout, (processes, flags, reference) in LAYOUTS.items():
        # later flags win, so a layout's --moe-aux-loss-coeff overrides the model's
        declare(runs, workdir, layout, processes, steps=STEPS, layout=flags, moe=reference != "dense")
    for layout in LOSS_LAYOUTS:
        processes, flags, _ = LAYOUTS[layout]
        for loss, extra in LOSSES.items():
            declare(runs, workdir, f"{layout}-{loss}", processes, steps=STEPS, layout=flags, extra=extra)
    declare(runs, workdir, "learn", steps=LEARN["steps"], lr=LEARN["lr"], extra=[
        ("--lr-decay-style", "cosine"), ("--lr-warmup-iters", LEARN["warmup"]), ("--min-lr", LEARN["min_lr"])])
    declare(runs, workdir, "cp2-local", 2, layout=[("--context-parallel-size", 2)],
            extra=[("--dpoc-core-attention", "local")])
    return runs


@pytest.fixture(scope="module")
def one_process(workdir, runs):
    """The one-process reference runs."""
    def get(name: str) -> list[dict]:
        return finished(runs, workdir, f"single-{name}")

    return get


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.slow
def test_layout_gives_the_one_process_losses(workdir, runs, one_process, layout):
    got, expected = finished(runs, workdir, layout), one_process(LAYOUTS[layout][2])
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for mine, theirs in zip(got, expected, strict=True):
        for key in COMPARED:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (layout, mine["step"], key)


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("layout", LOSS_LAYOUTS)
@pytest.mark.slow
def test_each_loss_family_gives_the_one_process_losses_at_tp2_and_pp2(workdir, runs, one_process, layout, loss):
    got = finished(runs, workdir, f"{layout}-{loss}")
    for mine, theirs in zip(got, one_process(loss), strict=True):
        for key in COMPARED:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (layout, loss, mine["step"], key)


@pytest.mark.slow
def test_first_line_is_measured_before_the_first_update(one_process):
    first = one_process("dense")[0]
    # policy and reference start from the same seeded weights: z = 0 for every pair
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert first["rewards/margins"] == 0.0 and first["rewards/accuracies"] == 0.0
    assert set(first) == {"step", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                          "rewards/margins", "logps/chosen", "logps/rejected", "fill", "grad_norm", "lr",
                          "samples_per_s", "tokens_per_s"}
    assert 0 < first["fill"] < 1  # micro-batches padded to their longest sequence


@pytest.mark.slow
def test_a_run_learns_the_preference_with_warmup_and_cosine(workdir, runs):
    steps, warmup, lr, min_lr = LEARN["steps"], LEARN["warmup"], LEARN["lr"], LEARN["min_lr"]
    got = finished(runs, workdir, "learn")
    late = got[-5:]
    assert sum(r["rewards/accuracies"] for r in late) / len(late) >= 0.9
    assert max(r["loss"] for r in late) < 0.5 < got[0]["loss"]
    assert all(r["rewards/margins"] > 0.3 for r in late)
    for r in got:  # megatron-core's schedule: linear warmup from 0, then cosine to min-lr
        done = r["step"] - 1
        if done <= warmup:
            expected = lr * done / warmup
        else:
            expected = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (done - warmup) / (steps - warmup)))
        assert r["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-12), r["step"]
    log = (workdir / "runs" / "learn" / "train.log").read_text().splitlines()
    assert log[-1].startswith(f"step {steps}/{steps} | loss ") and " pairs/s | " in log[-1]
    assert "ETA 0:00:00" in log[-1]


@pytest.mark.slow
def test_context_parallel_on_another_attention_kernel_is_refused_with_the_reason(workdir, runs):
    done = runs.result("cp2-local")
    assert done.returncode == 2  # every rank refuses it before joining the group (torchrun would report 1)
    assert (f"{workdir / 'cp2-local.args'}: --context-parallel-size: 2: the runtime's context parallelism runs on its sdpa and "
            "npu-fusion attention, not local (valid: 1, or --dpoc-core-attention sdpa on cpu or cuda, npu-fusion on "
            "npu)") in done.stderr
