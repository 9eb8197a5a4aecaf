"""Weights in and out: conversion GB/s both ways, and host memory per rank when the runtime loads HF weights.

Builds a Qwen3-shaped model of a few hundred MB (bf16) from a config with transformers, saves it as HF
safetensors, then
- `hf-to-mcore` and `mcore-to-hf` (the converter's own functions, each in a fresh process): seconds (imports
  excluded), GB/s over the bytes converted, and the process's peak RSS next to an idle process's (torch,
  megatron-core and transformers imported, nothing loaded);
- the runtime's HF load (`weight_sources.load` into megatron-core chunks built from the model's megatron
  flags) in 1 process and at tp2: per rank the parameter bytes it holds and its peak RSS.

Memory is the anonymous resident memory (what the process allocated; mapped safetensors pages are
page cache, reported apart). Streaming shows as peak ≈ idle + a tensor or two for the conversions, and ≈ the
memory after building the chunks + one tensor for the load (its parameters are allocated by megatron-core at
build time: the rank's shard). `process_cpu_seconds` (the whole process, imports included) is the steadier figure on a
busy machine. Run: `python bench/weights.py` (`--smoke`: a few MB); writes bench/results/weights.json
(`--out` elsewhere; a smoke run writes nothing unless given `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._shared import arguments, write_result  # noqa: E402
from dpoc.common.atomic import write_atomically  # noqa: E402
from dpoc.common.ports import free_port  # noqa: E402

SIZES = {  # Qwen3-shaped: (layers, hidden, ffn, heads, kv heads, head_dim, vocab)
    "full": (8, 1024, 3072, 16, 8, 64, 32000),
    "smoke": (2, 128, 256, 4, 2, 32, 1024),
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}


# the code this benchmark measures: its results' provenance (bench/_shared.provenance)
MEASURES = ("bench/weights.py", "dpoc/runtime/weights", "dpoc/runtime/model")


def make_model(size: str, directory: Path) -> int:
    import torch
    import transformers

    layers, hidden, ffn, heads, kv, head_dim, vocab = SIZES[size]
    config = transformers.Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                      head_dim=head_dim, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="100MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


class PeakMemory:
    """Samples a process's resident memory every 10 ms: anonymous (what the process allocated) and
    file-backed (mapped files, e.g. safetensors pages it touched: reclaimable page cache)."""

    def __init__(self, pid: int):
        import threading

        self.pid, self.anon_mb, self.file_mb = pid, 0.0, 0.0
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while self.running:
            try:
                fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines())
            except (OSError, ValueError):
                return
            if "RssAnon" not in fields:  # the process is exiting
                return
            self.anon_mb = max(self.anon_mb, int(fields["RssAnon"].split()[0]) / 1024)
            self.file_mb = max(self.file_mb, int(fields["RssFile"].split()[0]) / 1024)
            time.sleep(0.01)

    def stop(self) -> PeakMemory:
        self.running = False
        self.thread.join()
        return self


def in_fresh_process(code: str, work: Path) -> tuple[dict, PeakMemory]:
    """Run `code` (which sets `row`, a dict) in a fresh interpreter: `row` (with the process's CPU seconds), and
    its peak memory. `row` comes back in a file of its own, not on stdout, where library output could meet it."""
    result = work / f"row-{time.monotonic_ns()}.json"
    proc = subprocess.Popen([sys.executable, "-c", f"{code}\nimport json, pathlib, sys\n"
                             "pathlib.Path(sys.argv[1]).write_text(json.dumps(row))", str(result)], env=ENV)
    memory = PeakMemory(proc.pid)
    _, status, usage = os.wait4(proc.pid, 0)
    memory.stop()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {code}")
    row = json.loads(result.read_text())
    row["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    return row, memory


def load_ranks(hf_dir: Path, tp: int, work: Path) -> list[dict]:
    """`load_rank` in `tp` processes under torchrun; each rank's row, from its own file: on one shared stdout two
    ranks' lines can interleave (`{row 0}{row 1}\\n\\n` with PYTHONUNBUFFERED, where print writes the
    newline apart), which once failed a smoke run with `JSONDecodeError: Extra data`."""
    rows = work / f"load-tp{tp}"
    rows.mkdir()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp}",
                    "--master-addr=127.0.0.1", f"--master-port={free_port()}", __file__, "--load-rank",
                    json.dumps([str(hf_dir), tp, str(rows)])], env=ENV, capture_output=True, text=True, check=True)
    found = [json.loads(f.read_text()) for f in sorted(rows.glob("rank-*.json"))]
    if [r["rank"] for r in found] != list(range(tp)):
        raise SystemExit(f"load at tp{tp}: rows from ranks {[r['rank'] for r in found]}, expected 0..{tp - 1}")
    return found


IDLE = "import time, dpoc.runtime.weights.converter; time.sleep(0.5); row = {}"


def convert_code(direction: str, source: Path, out: Path) -> str:
    call = f"hf_to_mcore({str(source)!r}, {str(out)!r})" if direction == "hf-to-mcore" else \
        f"mcore_to_hf({str(source)!r}, {str(out)!r})"
    return ("import time; from dpoc.runtime.weights.converter import hf_to_mcore, mcore_to_hf;"
            f"t = time.perf_counter(); {call}; row = {{'seconds': time.perf_counter() - t}}")


def load_rank(code: str) -> None:
    """Under torchrun: build this rank's chunks for the HF model's megatron flags at the layout in `code`
    (its tp), load the HF weights into them, print anonymous memory before and while loading, and the
    parameter bytes."""
    import torch.distributed as dist

    from dpoc.contract import hf_config, megatron_args
    from dpoc.runtime.model import device as devices
    from dpoc.runtime.model.gpt import build_chunks, transformer_config
    from dpoc.runtime.step.session import init_distributed, initialize_parallel
    from dpoc.runtime.weights import weight_sources

    hf_dir, tp, rows = json.loads(code)
    arch = hf_config.architecture(hf_config.read_config(hf_dir, "", ""), hf_dir)
    flags = [f"{f}={v}" if v is not True else f for f, v in hf_config.model_flags(arch)]
    args = megatron_args.parse([*flags, "--dpoc-device=cpu", "--distributed-backend=gloo", "--dpoc-init=hf",
                                f"--dpoc-hf-weights={hf_dir}", f"--tensor-model-parallel-size={tp}"],
                               require_job=False)
    policy, _ = weight_sources.sources(args, "bench")
    device = devices.select("cpu", "gloo")
    init_distributed(device)

    def anon() -> float:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["RssAnon"].split()[0]) / 1024

    with devices.running_on(device):
        initialize_parallel(args)
        config = transformer_config(args, device)
        chunks = build_chunks(config, args)
        built = anon()
        memory = PeakMemory(os.getpid())
        started = time.perf_counter()
        weight_sources.load(policy, chunks, config, args)
        seconds = time.perf_counter() - started
        memory.stop()
        params = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    row = {"rank": dist.get_rank(), "anon_after_build_mb": built, "peak_anon_mb": memory.anon_mb,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "param_mb": params / 2**20,
           "load_seconds": seconds}
    write_atomically(Path(rows) / f"rank-{row['rank']}.json", json.dumps(row))
    dist.destroy_process_group()


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], "weights")
    parser.add_argument("--load-rank", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.load_rank:
        load_rank(cli.load_rank)
        return
    size = "smoke" if cli.smoke else "full"
    work = Path(tempfile.mkdtemp(prefix="dpoc-bench-weights-"))
    try:
        model_bytes = make_model(size, work / "hf")
        idle = in_fresh_process(IDLE, work)[1].anon_mb
        rows = {}
        for direction, source, out in (("hf-to-mcore", work / "hf", work / "mcore"),
                                       ("mcore-to-hf", work / "mcore", work / "hf-back")):
            row, peak = in_fresh_process(convert_code(direction, source, out), work)
            rows[direction] = {"seconds": row["seconds"], "gb_per_s": model_bytes / row["seconds"] / 1e9,
                               "process_cpu_seconds": row["cpu_seconds"], "peak_anon_mb": peak.anon_mb,
                               "peak_anon_over_idle_mb": peak.anon_mb - idle, "peak_file_backed_mb": peak.file_mb}
        loads = {f"tp{tp}": load_ranks(work / "hf", tp, work) for tp in (1, 2)}
        result = {"size": size, "model_mb": model_bytes / 2**20, "idle_process_anon_mb": idle,
                  "conversion": rows, "load": loads, "cpu_count": os.cpu_count(),
                  "note": "rough: measured on a shared 2-core machine"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"model: {result['model_mb']:.0f} MiB (bf16); idle process: {idle:.0f} MiB anonymous memory")
    for direction, row in rows.items():
        print(f"{direction:12s} {row['seconds']:7.2f} s  {row['gb_per_s']:6.3f} GB/s  peak anonymous "
              f"{row['peak_anon_mb']:6.0f} MiB (+{row['peak_anon_over_idle_mb']:.0f} over idle), file-backed "
              f"{row['peak_file_backed_mb']:.0f} MiB")
    for layout, ranks in loads.items():
        for r in ranks:
            print(f"load {layout} rank {r['rank']}: params {r['param_mb']:6.0f} MiB  anonymous after build "
                  f"{r['anon_after_build_mb']:6.0f}  peak while loading {r['peak_anon_mb']:6.0f} MiB  "
                  f"(peak RSS incl. mapped files {r['peak_rss_mb']:.0f}; {r['load_seconds']:.2f} s)")
    write_result(cli, "weights", result, MEASURES)


if __name__ == "__main__":
    main()
