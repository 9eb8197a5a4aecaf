"""Steps/s of the tiny CPU recipe under each core attention and with packing, from its rendered files.

    python bench/runtime_speed.py [--rounds 3 --steps 30 --warmup 3 --out FILE.json]  # --smoke: 4 steps, 1 process

`recipes/tiny_cpu.yaml` (tiny Qwen3, fp32, 8 pairs per step, micro-batch 2, seq_length 256, the orca-style
data in assets/tiny) is built with `training.packing` off or on, its preprocess.sh run once, and its
megatron.args trained under torchrun (2 gloo processes, dp 2, as shipped; and 1 process) with the core
attention forced (`--dpoc-core-attention` after the args file):
`local` (megatron-core's unfused DotProductAttention, the runtime's kernel before SDPA), `sdpa`, and `sdpa`
with packing. A step's time is the runtime's own (samples_per_s in metrics.jsonl); the first `--warmup`
steps are left out and each variant keeps the median of its best round (variants alternate: the machine is
shared). Also reports the fill (real tokens / row tokens) each variant logged.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._shared import arguments, write_result  # noqa: E402
from dpoc.compiler.pipeline import build  # noqa: E402

RECIPE = ROOT / "recipes" / "tiny_cpu.yaml"
VARIANTS = {"local": ("local", False), "sdpa": ("sdpa", False), "sdpa + packing": ("sdpa", True)}


# the code this benchmark measures: its results' provenance (bench/_shared.provenance)
MEASURES = ("bench/runtime_speed.py", "dpoc/runtime", "recipes/tiny_cpu.yaml")


def _env() -> dict[str, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "DPOC_MASTER_PORT": str(port),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def prepare(tmp: Path) -> Path:
    out = tmp / "preprocess"
    build(RECIPE, [f"dataset.output_prefix={tmp}/orca_tiny"], out=out)
    subprocess.run(["bash", str(out / "preprocess.sh")], cwd=ROOT, env=_env(), check=True, capture_output=True)
    return tmp / "orca_tiny"


def run(tmp: Path, data: Path, name: str, processes: int, steps: int, attention: str, packing: bool
        ) -> list[dict]:
    out, run_dir = tmp / name / "build", tmp / name / "run"
    build(RECIPE, [f"hardware.devices_per_node={processes}", f"training.train_iters={steps}",
                   f"training.packing={str(packing).lower()}", f"dataset.output_prefix={data}", f"run_dir={run_dir}"],
          out=out)
    env = _env()
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
               "--master-addr=127.0.0.1", f"--master-port={env['DPOC_MASTER_PORT']}", "-m", "dpoc.runtime.train",
               f"@{out / 'megatron.args'}", "--dpoc-core-attention", attention]  # the node script's torchrun
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, timeout=1800)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__.splitlines()[0], "runtime_speed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    rounds, steps, warmup = (1, 4, 1) if args.smoke else (args.rounds, args.steps, args.warmup)
    layouts = (1,) if args.smoke else (2, 1)
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = prepare(tmp)
        for round_ in range(rounds):
            for processes in layouts:
                for variant, (attention, packing) in VARIANTS.items():
                    key = f"{processes} process{'es' if processes > 1 else ''}, {variant}"
                    records = run(tmp, data, f"r{round_}-{processes}-{attention}-{packing}", processes, steps,
                                  attention, packing)
                    speed = statistics.median(r["samples_per_s"] for r in records[warmup:])
                    if key not in best or speed > best[key]["pairs_per_s"]:
                        best[key] = {"pairs_per_s": speed, "steps_per_s": speed / 8,
                                     "fill": statistics.mean(r["fill"] for r in records),
                                     "losses": [r["loss"] for r in records]}
    print(f"tiny_cpu recipe, {steps} steps of 8 pairs, median after {warmup} warm-up steps, best of {rounds} rounds")
    print(f"{'variant':34s} {'pairs/s':>9s} {'steps/s':>8s} {'fill':>6s}")
    for key, r in best.items():
        print(f"{key:34s} {r['pairs_per_s']:9.1f} {r['steps_per_s']:8.2f} {r['fill']:6.3f}")
    write_result(args, "runtime_speed", {"rounds": rounds, "steps": steps, "warmup": warmup, "variants": best},
                 MEASURES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
