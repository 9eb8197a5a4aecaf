"""The planner's memory model against the tensors of real runs on this machine (CPU, gloo, fp32).

For each layout: compile `recipes/tiny_cpu.yaml` with overrides (`plan_recipe`), render its megatron.args
(`dpoc_runtime.megatron_args`), point it at a synthetic pairwise dataset, add `--dpoc-measure-memory` and
run the real runtime under torchrun for one step. Every rank writes what it holds
(`dpoc/runtime/memory_probe.py`); each is compared with `estimate_memory(...)` for its pipeline stage.

What is compared, per rank:
- static: policy weights, gradient buffers (`main_grad` storages, bucket padding included), optimizer state
  (Adam m and v; fp32 has no master copy), reference weights. Target: within 2 %.
- activations: the bytes autograd saves during ONE micro-batch's policy forward (2 * mbs sequences of
  `seq_length` tokens, padded: dynamic padding off; the LM head on their response tokens only, which the model
  takes from the synthetic dataset's stats, made by the preprocessor's `Stats`) against the model's held
  activations for one
  micro-batch plus its logits term. The global batch is one micro-batch per data-parallel rank, so the
  model holds exactly one micro-batch (in-flight count 1) and nothing is multiplied. Target: within 15 %.

The memory model knows which kernels a device runs: fused ones on npu/cuda (flash attention, fused RMSNorm,
SwiGLU and rotary), megatron-core's unfused local layers on cpu, which save more
(`memory.unfused_kernel_bytes`). The `fused_activations` column shows what the npu/cuda variant of the
model would predict for the same run, i.e. how much of the CPU figure is kernel-specific; the fused-kernel
terms themselves cannot be measured without the hardware.

Run: `python bench/memory_vs_measured.py [--smoke] [--out FILE]` (a few minutes on 2 cores; `--smoke`: the
one-process and the two-process expert-parallel layouts only); writes `bench/results/memory_vs_measured.json`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._shared import arguments, write_result  # noqa: E402
from dpoc.common.ports import free_port  # noqa: E402
from dpoc.compiler.pipeline import plan_recipe  # noqa: E402
from dpoc.compiler.render.targets import dpoc_runtime  # noqa: E402
from dpoc.contract.megatron_args import format_args  # noqa: E402
from dpoc.contract.plan import Plan  # noqa: E402
from dpoc.planner.lengths import LengthStats, parse_stats  # noqa: E402
from dpoc.planner.memory import SEQUENCES_PER_PAIR, estimate_memory  # noqa: E402
from dpoc.planner.workload import dpo_workload  # noqa: E402
from dpoc.runtime.step.memory_probe import MEMORY_DIR  # noqa: E402
from tests.runtime.synthetic import pair_stats, write_pairs  # noqa: E402

RECIPE = ROOT / "recipes" / "tiny_cpu.yaml"
SEQ_LENGTH = 64
MICRO_BATCH = 2
PAIRS = 32
STATIC_PARTS = ("weights", "gradients", "optimizer", "reference")
STATIC_TARGET, ACTIVATION_TARGET = 0.02, 0.15
DENSE, MOE = "tiny-qwen3", "tiny-qwen3-moe"
LAYOUTS = {  # name: (model preset, processes, parallelism overrides[, other recipe overrides])
    "single": (DENSE, 1, {}),
    "single-packed": (DENSE, 1, {}, ["training.packing=true"]),
    "dp2": (DENSE, 2, {}),
    "tp2-sp": (DENSE, 2, {"tp": 2}),
    "pp2": (DENSE, 2, {"pp": 2}),
    "ep2-moe": (MOE, 2, {"ep": 2}),
    "tp2xpp2": (DENSE, 4, {"tp": 2, "pp": 2}),
    "ep2xtp2-moe": (MOE, 4, {"ep": 2, "tp": 2}),
    "single-lora": (DENSE, 1, {}, ["lora.rank=4", "lora.alpha=8"]),
    "tp2-sp-lora": (DENSE, 2, {"tp": 2}, ["lora.rank=4", "lora.alpha=8"]),
}


# the code this benchmark measures: its results' provenance (bench/_shared.provenance)
MEASURES = ("bench/memory_vs_measured.py", "dpoc/planner", "dpoc/runtime")


def compile_layout(preset: str, processes: int, parallelism: dict[str, int], other: Sequence[str] = ()) -> Plan:
    tp, pp = parallelism.get("tp", 1), parallelism.get("pp", 1)
    dp = processes // (tp * pp)
    overrides = [f"model.preset={preset}", f"hardware.devices_per_node={processes}",
                 f"training.seq_length={SEQ_LENGTH}", "training.dynamic_padding=false",
                 f"parallelism.micro_batch_size={MICRO_BATCH}",
                 f"training.global_batch_size={MICRO_BATCH * dp}",  # one micro-batch per replica
                 *(f"parallelism.{k}={v}" for k, v in parallelism.items()), *other]
    return plan_recipe(RECIPE, overrides)




def measure(plan: Plan, data: str, run_dir: Path) -> list[dict]:
    """Run the plan's megatron.args for one step with the memory probe; each rank's counts."""
    replaced = {"--data-path": data, "--dpoc-run-dir": str(run_dir)}  # the probe stops after step 1
    args = [(flag, replaced.get(flag, value)) for flag, value in dpoc_runtime.megatron_args(plan, resume=False)]
    args_file = run_dir.with_suffix(".args")
    args_file.write_text(format_args([*args, ("--dpoc-measure-memory", True)]), encoding="utf-8")
    processes = plan.hardware.world_size
    module = ["-m", "dpoc.runtime.train", f"@{args_file}"]
    command = [sys.executable, *module] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}", *module]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    files = sorted((run_dir / MEMORY_DIR).glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    return [json.loads(f.read_text()) for f in files]


def compare(plan: Plan, ranks: list[dict], lengths: LengthStats) -> list[dict]:
    """Predicted against measured bytes, one row per rank. `activations` is the model for this device (cpu:
    megatron-core's unfused local kernels); `fused_activations` what it predicts for npu/cuda's fused
    kernels, shown to say how much of the CPU figure is kernel-specific. `lengths`: the dataset's stats (the
    response tokens the LM head runs on; every row is padded to seq_length)."""
    workload = dpo_workload(plan.dpo.reference, plan.lora)
    estimate = estimate_memory(plan.model, plan.hardware, plan.layout, plan.training, lengths, workload=workload)
    fused = estimate_memory(plan.model, replace(plan.hardware, device="npu"), plan.layout, plan.training, lengths,
                            workload=workload)
    rows = []
    for measured in ranks:
        stage = estimate.stages[measured["pp_rank"]]
        fused_stage = fused.stages[measured["pp_rank"]]
        predicted = {part: float(getattr(stage, part)) for part in STATIC_PARTS}
        predicted["static"] = stage.static
        predicted["activations"] = stage.activations + stage.logits
        predicted["fused_activations"] = fused_stage.activations + fused_stage.logits
        got = {part: measured[part] for part in STATIC_PARTS}
        got["static"] = sum(got.values())
        got["activations"] = got["fused_activations"] = measured["activations_layers"] + measured["activations_other"]
        rows.append({
            "rank": measured["rank"], "stage": stage.stage, "params": measured["params"],
            "predicted_params": stage.params, "gradients_unpadded": measured["gradients_unpadded"],
            "predicted": predicted, "measured": got,
            "error": {k: (predicted[k] - got[k]) / got[k] if got[k] else 0.0 for k in predicted},
        })
    return rows


def _kib(n: float) -> str:
    return f"{n / 1024:9.1f}"


def print_table(name: str, plan: Plan, rows: list[dict]) -> None:
    lay = plan.layout
    sequences = SEQUENCES_PER_PAIR * lay.micro_batch_size
    print(f"\n{name}: {plan.model.name if hasattr(plan.model, 'name') else ''} world={lay.world_size} "
          f"tp={lay.tp} pp={lay.pp} ep={lay.ep} dp={lay.dp} sp={lay.sequence_parallel} "
          f"dist-opt={lay.distributed_optimizer}; one micro-batch = {sequences} x {plan.training.seq_length} "
          "tokens; KiB predicted / measured / error")
    keys = (*STATIC_PARTS, "static", "activations", "fused_activations")
    print(f"{'rank':>4} {'stage':>5} " + " ".join(f"{k:>30}" for k in keys))
    for row in rows:
        cells = [f"{_kib(row['predicted'][k])}/{_kib(row['measured'][k])} {row['error'][k]:+6.1%}" for k in keys]
        print(f"{row['rank']:>4} {row['stage']:>5} " + " ".join(f"{c:>30}" for c in cells))


SMOKE_LAYOUTS = ("single", "ep2-moe")


def main() -> int:
    args = arguments(__doc__.splitlines()[0], "memory_vs_measured").parse_args()
    layouts = {k: v for k, v in LAYOUTS.items() if k in SMOKE_LAYOUTS or not args.smoke}
    results, worst = {}, {"static": 0.0, "activations": 0.0, "fused_activations": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_pairs(Path(tmp) / "pairs", pairs=PAIRS)
        lengths = parse_stats(pair_stats(PAIRS, SEQ_LENGTH), "the synthetic pairs' stats")
        for name, (preset, processes, parallelism, *other) in layouts.items():
            overrides = other[0] if other else []
            plan = compile_layout(preset, processes, parallelism, overrides)
            rows = compare(plan, measure(plan, data, Path(tmp) / name), lengths)
            print_table(f"{name} ({preset})", plan, rows)
            results[name] = {"model": preset, "processes": processes, "parallelism": parallelism,
                             "overrides": overrides, "seq_length": SEQ_LENGTH, "micro_batch_size": MICRO_BATCH,
                             "ranks": rows}
            for row in rows:
                for key in worst:
                    worst[key] = max(worst[key], abs(row["error"][key]))
    summary = {"worst_static_error": worst["static"], "static_target": STATIC_TARGET,
               "worst_activation_error": worst["activations"], "activation_target": ACTIVATION_TARGET,
               "worst_error_if_fused_kernels_were_assumed": worst["fused_activations"]}
    print(f"\nworst |error|: static {worst['static']:.2%} (target {STATIC_TARGET:.0%}), activations "
          f"{worst['activations']:.2%} (target {ACTIVATION_TARGET:.0%}); assuming npu/cuda's fused kernels "
          f"instead would be off by {worst['fused_activations']:.2%}")
    write_result(args, "memory_vs_measured", {"summary": summary, "layouts": results}, MEASURES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
