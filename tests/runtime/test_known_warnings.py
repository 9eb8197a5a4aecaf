"""The runtime silences exactly the library warnings known to be harmless, and nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from dpoc.common.harmless_warnings import KNOWN_HARMLESS
from dpoc.runtime.known_warnings import silence
from tests.conftest import REPO

# the texts as megatron-core 0.16 and torch 2.13 print them in a run of the tiny CPU job
SEEN = [
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."),
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to local implementations of "
                  "multi_tensor_applier, multi_tensor_l2norm, and multi_tensor_scale"),
    (UserWarning, "Apex is not installed. Falling back to Torch Norm"),
    (UserWarning, "full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer."),
    (UserWarning, "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed. Its .grad attribute "
                  "won't be populated during autograd.backward()."),
    (FutureWarning, "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
                    "`torch.distributed.reduce_scatter_single` instead."),
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                    "`torch.distributed.all_gather_single` instead."),
    # on resume
    (FutureWarning, "`load_state_dict` is deprecated and will be removed in future versions. Please use `load` "
                    "instead."),
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor."),
    # convert mcore-to-hf
    (UserWarning, "torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a "
                  "single process."),
]


def _shown(category: type[Warning], message: str) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence()
        warnings.warn(message, category, stacklevel=1)
    return bool(caught)


@pytest.mark.parametrize("category, message", SEEN, ids=[m[:30] for _, m in SEEN])
def test_each_known_warning_is_silenced(category, message):
    assert not _shown(category, message)


def test_every_filter_matches_a_warning_seen_and_nothing_else_is_silenced():
    import re

    assert all(any(seen is category and re.match(pattern, message) for seen, message in SEEN)
               for category, pattern in KNOWN_HARMLESS)
    assert _shown(UserWarning, "some other library warning")
    assert _shown(DeprecationWarning, "Apex is not installed. Falling back to Torch Norm")  # same words, other kind
    assert _shown(UserWarning, "A note before: Apex is not installed. Falling back to Torch Norm")  # not its start


@pytest.mark.slow
def test_importing_the_runtime_or_reading_a_dataset_prints_no_library_warnings(tmp_path):
    """megatron-core's imports warn about TransformerEngine and Apex; the runtime imports them silently, and so
    does `dpoc preprocess` (its indexed datasets are megatron-core's), each in a fresh process (run side by side)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    codes = {"runtime": "import dpoc.runtime.train",
             "preprocess": f"from dpoc.data.pairwise import PairwiseWriter; PairwiseWriter({str(tmp_path / 'd')!r})"}
    procs = {name: subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env={**env, "PYTHONPATH": str(REPO)})
             for name, code in codes.items()}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0 and stderr == "", (name, stderr)


PROBE = """
import os, warnings, dpoc.runtime
warnings.warn('every rank raises this', UserWarning)
if os.environ['RANK'] == '1':
    warnings.warn('only rank 1 raises this', UserWarning)
for step in range(30):  # a text that changes every step: capped, not a flood
    warnings.warn(f'step {step} on rank ' + os.environ['RANK'], RuntimeWarning)
"""


def test_a_warning_from_any_rank_reaches_the_log_once_with_its_rank(tmp_path):
    """Two ranks of one torchrun agent (here: two children of this process, as torchrun's ranks are of it):
    rank 1's own warning shows, prefixed; the one both raise shows once; each rank stops at MAX_SHOWN."""
    from dpoc.runtime.known_warnings import MAX_SHOWN

    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(PYTHONPATH=str(REPO), TMPDIR=str(tmp_path), TORCHELASTIC_RUN_ID="test-run", MASTER_PORT="1")
    ranks = [subprocess.Popen([sys.executable, "-c", PROBE], cwd=REPO, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": rank}) for rank in ("0", "1")]
    log = "".join(rank.communicate(timeout=300)[1] for rank in ranks)
    assert all(rank.returncode == 0 for rank in ranks), log
    assert log.count("every rank raises this") == 1, log
    assert "[rank 1] <string>:5: UserWarning: only rank 1 raises this" in log
    for rank in ("0", "1"):  # the shared one comes from whichever rank raised it first: it counts for that one
        own = [line for line in log.splitlines() if line.startswith(f"[rank {rank}] ")]
        steps = [line for line in own if "RuntimeWarning: step " in line]
        assert len(steps) == MAX_SHOWN - sum("UserWarning" in line for line in own), log
        assert steps == [f"[rank {rank}] <string>:7: RuntimeWarning: step {k} on rank {rank}" for k in range(len(steps))]
        assert f"[rank {rank}] dpoc: {MAX_SHOWN} warnings shown on this rank; its further warnings are not shown" in log
    assert all(line.startswith("[rank ") or line.startswith("  ") for line in log.splitlines()), log


def test_without_torchrun_warnings_print_as_python_prints_them():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "RANK")}
    probe = "import warnings, dpoc.runtime; warnings.warn('a warning dpoc does not know', UserWarning)"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**env, "PYTHONPATH": str(REPO)})
    assert proc.stderr.startswith("<string>:1: UserWarning: a warning dpoc does not know"), proc.stderr


@pytest.mark.slow
def test_a_run_and_its_resume_print_no_warnings(tmp_path):
    """The tiny job on 2 ranks, then resumed from its checkpoint with more steps: not one library warning, and
    nothing left in the launch's temp directory."""
    from dpoc.compiler.pipeline import build
    from tests.conftest import RECIPES, script_env, tiny_dataset

    common = [f"dataset.output_prefix={tiny_dataset()}", f"run_dir={tmp_path}/run", "training.warmup_iters=1",
              "training.save_interval=2"]
    temp = tmp_path / "tmp"  # the launch's temp directory: the ranks' warning markers must not stay in it
    temp.mkdir()
    env = {**{k: v for k, v in script_env().items() if k != "PYTHONWARNINGS"}, "TMPDIR": str(temp)}
    for steps in (2, 4):
        build(RECIPES / "tiny_cpu.yaml", [*common, f"training.train_iters={steps}"], out=tmp_path / "b")
        done = subprocess.run([sys.executable, "-m", "dpoc", "launch", str(tmp_path / "b")], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Warning" not in done.stdout + done.stderr, done.stdout
        left = sorted(p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_"))  # a lasting cache
        assert left == [], left
    assert "resumed from" in done.stdout
