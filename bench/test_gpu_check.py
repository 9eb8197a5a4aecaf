"""The prepared GPU check cannot rot: CI runs `bench/gpu_check.sh --dry` (the same steps on the CPU, at tiny sizes)
and shellchecks it and bench/gpu_wheels.sh; the layout comparison fails a layout that disagrees."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench import _gpu_check
from bench._shared import result_digests, smoke_problems

BENCH = Path(__file__).resolve().parent
FIGURES = ["dpo_vs_trl.json", "dpo_vs_trl.log", "env.txt", "layouts.json", "layouts.log", "moe.log", "summary.json",
           "tiny.log"]


def test_the_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    done = subprocess.run([shellcheck, "--severity=style", str(BENCH / "gpu_check.sh"), str(BENCH / "gpu_wheels.sh")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_the_dry_check_runs_every_step_on_the_cpu(tmp_path):
    before = result_digests()
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--dry"], cwd=BENCH.parent, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert sorted(os.listdir(tmp_path)) == FIGURES  # what comes back from the device: at most 8 files
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry"] == 1 and list(summary["steps"]) == ["tiny", "moe", "layouts", "dpo_vs_trl"]
    assert all(s["exit"] == 0 for s in summary["steps"].values())
    moe = (tmp_path / "moe.log").read_text()  # the MoE run's node script ran the device check, then trained
    assert ("device check: one layer forward, backward and optimizer step (experts sequential, tp1 ep1 etp1, "
            "1 process): ok") in moe
    layouts = json.loads((tmp_path / "layouts.json").read_text())
    assert layouts["precision"] == "fp32" and layouts["base"]["steps"] == 10
    assert sorted(layouts["layouts"]) == ["mbs1", "mbs8", "packing", "precomputed", "recompute-full",
                                          "recompute-selective"]
    assert all(r["agrees"] and r["steps"] == 3 for r in layouts["layouts"].values())
    bench = json.loads((tmp_path / "dpo_vs_trl.json").read_text())
    assert bench["setup"]["device"] == "cpu" and set(bench["comparison"]) == {"live", "precomputed", "matmul_rate"}
    assert smoke_problems("dpo_vs_trl", bench) == []  # bench/test_smoke.py leaves this smoke to this check
    assert result_digests() == before


def test_an_unknown_argument_exits_2():
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--wet"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip() == \
        "gpu_check.sh: unknown argument --wet (valid: --wheels DIR, --dry)"


def _run_dir(path: Path, logps: float, grad_norm: float, loss_after: float) -> Path:
    rows = [{"logps/chosen": logps, "logps/rejected": 2 * logps, "grad_norm": grad_norm, "loss": 0.6931,
             "samples_per_s": 10.0},
            {"logps/chosen": logps, "logps/rejected": 2 * logps, "grad_norm": grad_norm, "loss": loss_after,
             "samples_per_s": 12.0}]
    path.mkdir()
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_layout_that_disagrees_fails_the_comparison(tmp_path):
    base = _run_dir(tmp_path / "base", -100.0, 3.0, 0.69)
    same = _run_dir(tmp_path / "same", -100.5, 3.05, 0.695)  # within bf16's rounding
    off = _run_dir(tmp_path / "off", -100.0, 3.0, 0.75)  # the first update went elsewhere
    out = tmp_path / "layouts.json"
    args = ["compare", "--precision", "bf16", "--out", str(out), str(base), f"same={same}"]
    assert _gpu_check.main(args) == 0
    assert _gpu_check.main([*args, f"off={off}"]) == 1
    result = json.loads(out.read_text())
    assert result["layouts"]["same"]["agrees"] and not result["layouts"]["off"]["agrees"]
    assert result["layouts"]["off"]["differences"]["loss after one update"] == 0.75 - 0.69
