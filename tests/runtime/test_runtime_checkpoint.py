"""Training checkpoints of the runtime, run for real (`torchrun`, gloo on 127.0.0.1): resuming at another
layout through the reshardable checkpoint, a layout it cannot reshard to, damaged files, and the checks a
resumed run makes before it loads anything."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch

from dpoc.common import atomic
from dpoc.contract import megatron_args
from dpoc.contract.runs import METRICS, TRACKER, folder_name
from dpoc.runtime.checkpoint import publish
from dpoc.runtime.checkpoint import save_load as checkpoint
from tests.runtime.batched import Runs
from tests.runtime.synthetic import write_args, write_pairs
from tests.runtime.test_runtime_train import COMPARED, metrics

STEPS = 4
TP2 = [("--tensor-model-parallel-size", 2)]
PP2 = [("--pipeline-model-parallel-size", 2)]
EP2 = [("--expert-model-parallel-size", 2)]
OVERLAP = [("--overlap-param-gather", True)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("checkpoint")
    write_pairs(tmp / "pairs", pairs=64)
    return tmp


def _args(workdir: Path, name: str, save: Path, load: Path | None = None, flags=(), run: str | None = None,
          **kwargs) -> Path:
    """`name`.args, its run directory runs/`name` (or runs/`run`)."""
    extra = [("--save", save), ("--save-interval", 2), *([("--load", load)] if load else []), *flags]
    return write_args(workdir / f"{name}.args", str(workdir / "pairs"), workdir / "runs" / (run or name),
                      steps=STEPS, extra=extra, **kwargs)


def _add(runs: Runs, name: str, args_file: Path, processes: int) -> None:
    runs.add(name, ["-m", "dpoc.runtime.train", f"@{args_file}"], processes)


def _ok(done) -> str:
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


SAVES = {"dense-tp2": (2, dict(layout=TP2)), "moe-dp2": (2, dict(moe=True)),
         "moe-dp2-overlap": (2, dict(moe=True, flags=OVERLAP)),
         "plain": (1, dict(distributed_optimizer=False))}


@pytest.fixture(scope="module")
def saved(workdir) -> dict[str, tuple[Path, list[dict]]]:
    """Uninterrupted 4-step runs saving at steps 2 and 4: dense at tp2, MoE at dp2 (also with the parameter
    all-gather deferred to the next forward, `--overlap-param-gather`), and dense in one process with the plain
    (not distributed) optimizer (one launch per process count)."""
    runs = Runs(workdir / "saves-launches")
    for name, (processes, kwargs) in SAVES.items():
        _add(runs, name, _args(workdir, name, workdir / "saves" / name, **kwargs), processes)
    out = {}
    for name in SAVES:
        _ok(runs.result(name))
        save = workdir / "saves" / name
        assert publish.iterations(save) == [4, 2]
        out[name] = save, metrics(workdir / "runs" / name)
    return out


def _copy(save: Path, to: Path, iterations: tuple[int, ...]) -> Path:
    """A save directory holding only some of `save`'s checkpoints, the newest named by the tracker."""
    for iteration in iterations:
        shutil.copytree(save / folder_name(iteration), to / folder_name(iteration))
    atomic.write_atomically(to / TRACKER, f"{max(iterations)}\n")
    return to


def _largest_shard(folder: Path) -> Path:
    return max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)


RESUMES = [
    pytest.param("tp2-to-pp2", "dense-tp2", PP2, False, "RNG: the checkpoint's layout differs, so each rank keeps "
                 "its freshly seeded generators", id="tp2-to-pp2"),
    # cp is no weight dimension: the CP ranks hold replicas of the weights (and shards of the distributed
    # optimizer's state over dp·cp)
    pytest.param("tp2-to-cp2", "dense-tp2", [("--context-parallel-size", 2)], False, "RNG: the checkpoint's "
                 "layout differs, so each rank keeps its freshly seeded generators", id="tp2-to-cp2"),
    pytest.param("dp2-to-ep2", "moe-dp2", [*EP2, ("--no-load-rng", True)], True, "--no-load-rng: every rank keeps "
                 "its freshly seeded generators", id="dp2-to-ep2-moe"),
]


@pytest.fixture(scope="module")
def resumed(workdir, saved) -> tuple[Runs, Path]:
    """Every run that starts from the saves above, launched together per process count: the resumes at another
    layout (from step 2), without the optimizer, at a layout the checkpoint cannot reshard to, and over a save
    whose step 4 has one byte flipped (`damaged`); and the shard flipped."""
    runs = Runs(workdir / "resume-launches")
    for case in RESUMES:
        name, source, layout, moe, _ = case.values
        target = _copy(saved[source][0], workdir / "saves" / name, (2,))
        _add(runs, name, _args(workdir, name, target, target, layout=layout, moe=moe), 2)
    target = _copy(saved["plain"][0], workdir / "saves" / "no-optim", (2,))
    _add(runs, "no-optim", _args(workdir, "no-optim", target, target, distributed_optimizer=False,
                                 flags=[("--no-load-optim", True)]), 1)
    target = _copy(saved["dense-tp2"][0], workdir / "saves" / "to-plain", (4,))
    _add(runs, "to-plain", _args(workdir, "to-plain", target, target, distributed_optimizer=False), 1)
    target = _copy(saved["plain"][0], workdir / "saves" / "damaged", (2, 4))
    shard = _largest_shard(target / "iter_0000004")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    shard.write_bytes(bytes(data))
    _add(runs, "damaged", _args(workdir, "damaged", target, target, distributed_optimizer=False), 1)
    target = _copy(saved["moe-dp2-overlap"][0], workdir / "saves" / "overlap-resume", (2,))
    _add(runs, "overlap-resume", _args(workdir, "overlap-resume", target, target, moe=True, flags=OVERLAP), 2)
    return runs, shard


@pytest.mark.parametrize(("name", "source", "layout", "moe", "rng_note"), RESUMES)
@pytest.mark.slow
def test_a_checkpoint_resumes_at_another_layout(workdir, saved, resumed, name, source, layout, moe, rng_note):
    uninterrupted = saved[source][1]
    target = workdir / "saves" / name
    out = _ok(resumed[0].result(name))
    assert f"resumed from {target}/iter_0000002: iteration 2, 16 samples consumed" in out
    assert "layout: resharded from tp=" in out and rng_note in out
    resumed_metrics = metrics(workdir / "runs" / name)
    assert [r["step"] for r in resumed_metrics] == [3, 4]
    for mine, theirs in zip(resumed_metrics, uninterrupted[2:], strict=True):
        for key in COMPARED:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (name, mine["step"], key)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint (the model's weights, the optimizer's state), read in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = folder.parent / f"{folder.parent.name}-{folder.name}.pt"
    dcp_to_torch_save(str(folder), str(out))
    loaded = torch.load(out, weights_only=False)
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def _same_tensors(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(mine) == sorted(theirs)
    assert "embedding.word_embeddings.weight" in mine and "optimizer.state.param.output_layer.weight" in mine
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key


@pytest.mark.slow
def test_the_deferred_parameter_gather_trains_and_saves_what_the_immediate_one_does(workdir, saved):
    """`--overlap-param-gather` at dp2 with the distributed optimizer: the same losses and gradient norms as
    without it, and checkpoints holding the same tensors bit for bit (the save gathers the shards the step
    left ungathered; without that its weights would be this rank's shard of step k and the others' of k-1)."""
    (overlap_save, overlap), (plain_save, plain) = saved["moe-dp2-overlap"], saved["moe-dp2"]
    assert [{k: r[k] for k in COMPARED} for r in overlap] == [{k: r[k] for k in COMPARED} for r in plain]
    for iteration in (2, 4):
        _same_tensors(_tensors(overlap_save / folder_name(iteration)), _tensors(plain_save / folder_name(iteration)))


@pytest.mark.slow
def test_a_resume_with_the_deferred_parameter_gather_is_the_uninterrupted_run(workdir, saved, resumed):
    """Saved at step 2 and resumed with `--overlap-param-gather`: steps 3 and 4 and the step-4 checkpoint are
    the uninterrupted run's, bit for bit."""
    target = workdir / "saves" / "overlap-resume"
    assert f"resumed from {target}/iter_0000002" in _ok(resumed[0].result("overlap-resume"))
    uninterrupted_save, uninterrupted = saved["moe-dp2-overlap"]
    resumed_metrics = metrics(workdir / "runs" / "overlap-resume")
    assert [r["step"] for r in resumed_metrics] == [3, 4]
    assert [{k: r[k] for k in COMPARED} for r in resumed_metrics] == [{k: r[k] for k in COMPARED}
                                                                      for r in uninterrupted[2:]]
    _same_tensors(_tensors(target / folder_name(4)), _tensors(uninterrupted_save / folder_name(4)))


@pytest.mark.slow
def test_no_load_optim_keeps_megatrons_meaning(workdir, saved, resumed):
    """The weights and the step come back, the optimizer state does not: step 3's loss (measured before its
    update) is the uninterrupted run's, step 4's is not."""
    uninterrupted = saved["plain"][1]
    assert "--no-load-optim: the optimizer and the LR schedule start afresh" in _ok(resumed[0].result("no-optim"))
    got = metrics(workdir / "runs" / "no-optim")
    assert [r["step"] for r in got] == [3, 4]
    assert got[0]["loss"] == uninterrupted[2]["loss"] and got[1]["loss"] != uninterrupted[3]["loss"]


@pytest.mark.slow
def test_a_layout_the_checkpoint_cannot_reshard_to_is_refused_before_training(workdir, resumed):
    target = workdir / "saves" / "to-plain"
    done = resumed[0].result("to-plain")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        f"{target}/iter_0000004: (layout): saved at tp=2 pp=1 vpp=1 cp=1 ep=1 etp=2 dp=1 (distributed optimizer), "
        "cannot resume at tp=1 pp=1 vpp=1 cp=1 ep=1 etp=1 dp=1 (plain optimizer): the distributed and the plain "
        "optimizer keep their state in different forms (valid: the checkpoint's parallelism.distributed_optimizer)")
    assert not (workdir / "runs" / "to-plain" / METRICS).exists()


@pytest.mark.slow
def test_damaged_checkpoints_are_named_and_never_loaded(workdir, saved, resumed):
    """(With the plain optimizer, whose resume this also checks: megatron-core's own load path.)"""
    uninterrupted = saved["plain"][1]
    target = workdir / "saves" / "damaged"
    runs, shard = resumed
    out = _ok(runs.result("damaged"))
    assert (f"warning: {target}/iter_0000004 is damaged and is not loaded: {shard}: (checkpoint): corrupted: its "
            "sha256 differs from the manifest's; trying the previous checkpoint") in out
    assert f"resumed from {target}/iter_0000002" in out
    run_metrics = workdir / "runs" / "damaged" / METRICS
    got = metrics(run_metrics.parent)
    assert [{k: r[k] for k in COMPARED} for r in got] == [{k: r[k] for k in COMPARED} for r in uninterrupted[2:]]

    # now both: the re-saved step 4 truncated, step 2 corrupted: the run stops before training; and a fresh
    # start over this run is refused (one launch for the two)
    logged = run_metrics.read_text()
    newest = _largest_shard(target / "iter_0000004")
    size = newest.stat().st_size
    newest.write_bytes(newest.read_bytes()[:100])
    older = _largest_shard(target / "iter_0000002")
    data = bytearray(older.read_bytes())
    data[-1] ^= 0x01
    older.write_bytes(bytes(data))
    again = Runs(workdir / "damaged-launches")
    _add(again, "both-damaged", workdir / "damaged.args", 1)
    _add(again, "fresh", _args(workdir, "damaged-fresh", target, distributed_optimizer=False, run="damaged"), 1)
    done = again.result("both-damaged")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-3:] == [
        f"{newest}: (checkpoint): truncated or overwritten: 100 bytes, the manifest lists {size}",
        f"{older}: (checkpoint): corrupted: its sha256 differs from the manifest's",
        f"{target}: (checkpoints): none of its 2 checkpoints is intact (each damaged file is named above), so "
        "nothing was loaded (valid: restore the files, or move the save and run directories away and start afresh "
        "with DPOC_RESUME=0)"]
    assert run_metrics.read_text() == logged

    fresh = again.result("fresh")
    assert fresh.returncode == 2
    assert f"{target}: (checkpoints): holds an earlier run's checkpoints (newest: iteration 4)" in fresh.stderr
    assert f"{run_metrics}: (file): holds 2 steps of an earlier run" in fresh.stderr  # steps 3 and 4


@pytest.fixture
def parse(tmp_path):
    def get(**kwargs) -> argparse.Namespace:
        return megatron_args.parse([f"@{write_args(tmp_path / 'x.args', 'pairs', tmp_path / 'run', **kwargs)}"])
    return get


DATA = {"seed": 1234, "global_batch_size": 8, "pairs": 64, "dataset_sha256": "a" * 64}


def test_a_resume_must_be_the_same_model_data_order_and_reference(parse):
    saved = checkpoint.records(parse(), 2, DATA, iteration=2)
    other = parse(extra=[("--hidden-size", 128), ("--seed", 7), ("--global-batch-size", 16)])
    current = checkpoint.records(other, 2, {**DATA, "seed": 7, "global_batch_size": 16, "pairs": 65,
                                            "dataset_sha256": "b" * 64})
    lines = [str(p) for p in checkpoint.resume_problems(saved, current, "m.args", "ck/iter_0000002", True)]
    assert lines == [
        "m.args: --hidden-size: is 128 but ck/iter_0000002 holds a model with 64; a checkpoint resumes only its own "
        "model (valid: 64, or a fresh run)",
        "m.args: --seed: is 7 but ck/iter_0000002 was trained with 1234; the data order is a function of seed, "
        "global batch and dataset, so a resumed run needs the same (valid: 1234)",
        "m.args: --global-batch-size: is 16 but ck/iter_0000002 was trained with 8; the data order is a function of "
        "seed, global batch and dataset, so a resumed run needs the same (valid: 8)",
        "m.args: --data-path: holds 65 pairs (index sha256 bbbbbbbbbbbb) but ck/iter_0000002 was trained on 64 "
        "pairs (aaaaaaaaaaaa); a resumed run needs the same dataset (valid: the dataset it was trained on)",
        f"m.args: --ref-model: the reference is seeded-init:seed=7 (sha256 {current['reference']['sha256'][:12]}) "
        f"but ck/iter_0000002 was trained against seeded-init:seed=1234 ({saved['reference']['sha256'][:12]}); a "
        "resumed DPO run keeps its reference (valid: seeded-init:seed=1234)"]


def test_the_plain_optimizers_checkpoint_keeps_its_tp_and_pp(parse):
    saved = checkpoint.records(parse(distributed_optimizer=False, layout=TP2), 2, DATA)
    assert checkpoint.resume_problems(saved, checkpoint.records(parse(distributed_optimizer=False, layout=TP2), 4,
                                                                DATA), "m", "ck", True) == []  # dp 1 -> 2
    pp2 = checkpoint.records(parse(distributed_optimizer=False, layout=PP2), 2, DATA)
    assert [str(p) for p in checkpoint.resume_problems(saved, pp2, "m", "ck", True)] == [
        "ck: (layout): saved at tp=2 pp=1 vpp=1 cp=1 ep=1 etp=2 dp=1 (plain optimizer), cannot resume at tp=1 "
        "pp=2 vpp=1 cp=1 ep=1 etp=1 dp=1 (plain optimizer): only the distributed optimizer's checkpoints reshard "
        "across tp/pp/ep (valid: resume at tp=2 pp=1 vpp=1 cp=1 ep=1 etp=2 dp=1 (plain optimizer))"]
    assert checkpoint.resume_problems(saved, pp2, "m", "ck", with_optimizer=False) == []  # the model alone reshards


def test_load_alone_resumes_and_load_with_finetune_starts_from_the_weights(parse):
    """Megatron's convention: --finetune starts a fresh run from --load's weights (checkpoint.init: converted;
    the fresh-start rule and no resume), --load alone resumes a training checkpoint."""
    assert megatron_args.resuming(parse(extra=[("--load", "w")]))
    assert not megatron_args.resuming(parse(extra=[("--load", "w"), ("--finetune", True)]))
    assert not megatron_args.resuming(parse())
