"""Benchmark `dpoc preprocess`: tokens/s on 1 and 2 workers vs a plain `datasets.map` + tokenizer loop,
and peak RSS on a ~10 MB vs a ~200 MB generated orca-style input (streaming keeps it flat).

    python bench/preprocess.py [--small-mb 10] [--large-mb 200] [--repeat 3] [--smoke] [--out FILE]

Each job runs in a fresh process that imports its libraries first and then times only the work; the
parent samples the job's process tree (workers included) for peak RSS. Prints a table and writes
bench/results/preprocess.json. Needs the `bench` extra (datasets) and the tiny tokenizer in assets/.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._shared import arguments, write_result  # noqa: E402

TOKENIZER = REPO / "assets" / "tiny" / "tokenizer"
SEQ_LENGTH = 8192  # long enough that nothing is dropped: every job tokenizes the same pairs
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "what", "is", "answer",
         "short", "question", "hello", "world", "red", "green", "blue", "apple", "pear", "plum", "river",
         "stone", "cloud", "bird", "fish", "tree", "house", "door", "lamp", "book", "cat", "sun", "moon",
         "star", "road", "hill", "lake", "wind", "rain", "snow", "leaf", "seed", "root", "larger", "repeat",
         "after", "me", "you", "are", "a", "helpful", "assistant"]


# the code this benchmark measures: its results' provenance (bench/_shared.provenance)
MEASURES = ("bench/preprocess.py", "dpoc/data")


def generate(path: Path, megabytes: float, seed: int = 0) -> int:
    """Orca-style JSON Lines of about `megabytes` MB; returns the number of pairs."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    pairs, size = 0, 0
    with path.open("w") as f:
        while size < megabytes * 1_000_000:
            row = {"system": rng.choice(["", "You are a helpful assistant."]), "question": text(20, 120),
                   "chosen": text(40, 300), "rejected": text(40, 300)}
            line = json.dumps(row) + "\n"
            f.write(line)
            size += len(line)
            pairs += 1
    return pairs


# ---------------------------------------------------------------- jobs (run in a child process)

def job_dpoc(path: str, workers: int, out: str) -> dict:
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (imports are not part of the timing)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(TOKENIZER))  # the first load scans transformers: untimed, as below

    from dpoc.data.config import build_config
    from dpoc.data.pipeline import preprocess

    config = build_config({"input": path, "tokenizer": str(TOKENIZER), "output_prefix": out,
                           "seq_length": SEQ_LENGTH, "template": "chatml", "workers": workers,
                           "map_keys": {"prompt": "question", "query": "", "system": "system"}}, "bench")
    start = time.perf_counter()
    stats = preprocess(config)
    return {"seconds": time.perf_counter() - start, "tokens": stats.tokens_total, "pairs": stats.pairs_kept}


def job_datasets_map(path: str, workers: int, out: str) -> dict:
    """The plain alternative: datasets' JSON loader + a batched map that renders chatml and tokenizes."""
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))

    def encode(batch):
        prompts = [(f"<|im_start|>system\n{s}<|im_end|>\n" if s else "")
                   + f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
                   for s, q in zip(batch["system"], batch["question"], strict=True)]
        ids = {k: tokenizer(texts, add_special_tokens=False)["input_ids"] for k, texts in
               (("prompt", prompts), ("chosen", [c + "<|im_end|>" for c in batch["chosen"]]),
                ("rejected", [r + "<|im_end|>" for r in batch["rejected"]]))}
        out = {}
        for side in ("chosen", "rejected"):
            pairs = list(zip(ids["prompt"], ids[side], strict=True))
            out[f"{side}_input_ids"] = [p + r for p, r in pairs]
            out[f"{side}_labels"] = [[-100] * len(p) + r for p, r in pairs]
        return out

    start = time.perf_counter()
    data = datasets.load_dataset("json", data_files=path, split="train", cache_dir=out)
    data = data.map(encode, batched=True, remove_columns=data.column_names,
                    num_proc=workers if workers > 1 else None)
    tokens = sum(len(ids) for side in ("chosen", "rejected") for ids in data[f"{side}_input_ids"])
    return {"seconds": time.perf_counter() - start, "tokens": tokens, "pairs": len(data)}


JOBS = {"dpoc": job_dpoc, "datasets.map": job_datasets_map}


def run_job(name: str, path: Path, workers: int, scratch: Path) -> dict:
    """Run one job in a child process; sample its process tree's total RSS every 50 ms."""
    out = Path(tempfile.mkdtemp(prefix=f"{name}-{workers}-{path.stem}-", dir=scratch))  # fresh: no caches
    code = (f"import json, sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'bench')!r}]; "
            f"import preprocess as b; print(json.dumps(b.JOBS[{name!r}]({str(path)!r}, {workers}, "
            f"{str(out / 'p')!r})))")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=env, text=True)
    proc, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    stdout, stderr = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"{name} workers={workers} failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    size_mb = round(path.stat().st_size / 1e6, 1)
    return {"job": name, "workers": workers, "input": path.name, "input_mb": size_mb, **result,
            "tokens_per_s": result["tokens"] / result["seconds"], "peak_rss_mb": peak / 1e6}


def _best(runs: list[dict]) -> dict:
    fastest = min(runs, key=lambda r: r["seconds"])
    return {**fastest, "runs": len(runs), "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], "preprocess")
    parser.add_argument("--small-mb", type=float, default=10, help="--smoke: 0.1")
    parser.add_argument("--large-mb", type=float, default=200, help="--smoke: 0.3")
    parser.add_argument("--repeat", type=int, default=3, help="runs per small-input job; the fastest counts "
                        "(--smoke: 1, and one worker only)")
    args = parser.parse_args()
    if args.smoke:
        args.small_mb, args.large_mb, args.repeat = 0.1, 0.3, 1
    with tempfile.TemporaryDirectory(prefix="dpoc-bench-") as tmp:
        scratch = Path(tmp)
        small, large = scratch / f"orca_{args.small_mb:g}mb.jsonl", scratch / f"orca_{args.large_mb:g}mb.jsonl"
        counts = {small.name: generate(small, args.small_mb),
                  large.name: generate(large, args.large_mb, seed=1)}
        # the machine is shared: take each small job's fastest of --repeat runs (peak RSS of all runs)
        jobs = [("dpoc", 1), ("datasets.map", 1)] if args.smoke else [
            ("dpoc", 1), ("dpoc", 2), ("datasets.map", 1), ("datasets.map", 2)]  # each job a process: few in smoke
        rows = [_best([run_job(job, small, workers, scratch) for _ in range(args.repeat)]) for job, workers in jobs]
        rows.append(run_job("dpoc", large, 1, scratch))
    base = next(r for r in rows if r["job"] == "datasets.map" and r["workers"] == 1)["tokens_per_s"]
    print(f"{'job':<14}{'workers':>8}{'input':>10}{'pairs':>9}{'seconds':>9}{'tokens/s':>12}{'vs map':>8}"
          f"{'peak RSS MB':>13}")
    for r in rows:
        r["vs_datasets_map_1"] = r["tokens_per_s"] / base
        print(f"{r['job']:<14}{r['workers']:>8}{r['input_mb']:>8.0f}MB{r['pairs']:>9}{r['seconds']:>9.1f}"
              f"{r['tokens_per_s']:>12,.0f}{r['vs_datasets_map_1']:>7.2f}x{r['peak_rss_mb']:>13,.0f}")
    rss_small, rss_large = rows[0]["peak_rss_mb"], rows[-1]["peak_rss_mb"]
    growth = rss_large / rss_small - 1
    print(f"peak RSS, dpoc 1 worker: {rss_small:,.0f} MB on {args.small_mb:g} MB -> {rss_large:,.0f} MB on "
          f"{args.large_mb:g} MB ({growth:+.1%}; target within 20%)")
    result = {"pairs_generated": counts, "seq_length": SEQ_LENGTH, "cpu_count": os.cpu_count(), "rows": rows,
              "rss_growth_small_to_large": growth}
    out = write_result(args, "preprocess", result, MEASURES)
    if out is not None:
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
