"""Pairs/s of the dpoc runtime vs TRL's DPOTrainer on the same weights and token ids, both sides swept alike.

    python bench/dpo_vs_trl.py [--pairs 256 --steps 6 --warmup 2 --rounds 3 --threads 1,2 \
        --micro-batches 8,4,2,1 --packed 8,2 --device cpu] [--smoke] [--out FILE.json]

Equal work. One tiny Qwen3 (hidden 256, 4 layers, GQA, q/k norm, untied vocab 8000; random weights, seeded) is
saved with `save_pretrained`: TRL loads that folder, dpoc reads the same safetensors (`--dpoc-init hf`). The pairs
are synthetic token ids (prompts 40-149, responses 44-147 tokens ending in EOS), written once as dpoc's indexed
dataset and once as text for a word-level tokenizer that maps "w<id>" back to <id>; the TRL worker checks that
every tokenized pair equals dpoc's. Both sides train the same pairs in every step (dpoc's step order: TRL reads
the dataset sequentially, each step's pairs sorted by length as dpoc's unpacked micro-batches are, so at equal
micro-batch both pad the same rows), 8 pairs per step, sigmoid DPO beta 0.1, Adam(W) lr 1e-5 constant, betas
(0.9, 0.999), eps 1e-8, no weight decay, gradient clipping 1.0, fp32 (TRL: bf16 off), no gradient
checkpointing (TRL's default is on: slower), no dropout, max length 1024 (nothing is cut). The bench asserts
that both sides agree on step 1 (policy log-probs of chosen and rejected, gradient norm) and on the loss after
the first update, so the two sides really compute the same training.

The same sweep for both sides, every point in a fresh process:
  - threads 1 and 2 (`--threads`: OMP_NUM_THREADS and torch.set_num_threads in each worker);
  - micro-batch 8, 4, 2 and 1, accumulating to 8 pairs per optimizer step (`--micro-batches`), padded to
    each micro-batch's longest pair;
  - each side's own padding removal: dpoc's packing (`--dpoc-packing`: pairs share token streams of
    2 x budget x seq_length tokens, seq_length 512; budgets `--packed`), TRL's `padding_free=True` when the
    installed TRL honours it (1.16 logs that it is disabled and pads: the JSON records what the trainer said,
    and no such point runs);
  - reference live on both, and precomputed on both (TRL `precompute_ref_log_probs=True`, its pass at 8 pairs
    per batch; dpoc `--dpoc-reference precomputed`, its pass `python -m dpoc.runtime.precompute` at 8 pairs
    per micro-batch). Live is compared with live and precomputed with precomputed; step times never include
    a precompute pass, which is timed on its own and reported.

One clock for both. Each worker registers the same global post-hook on torch's optimizer step (both sides end
an optimizer step in a torch Adam(W): megatron's distributed optimizer in its inner one, TRL in the AdamW that
accelerate wraps); a step's time is the wall clock from the previous step's update to its own. That period
holds everything each loop does per step: batch building, the reference and policy passes, the update, and
each side's per-step logging (both log every step: dpoc its metrics line, TRL its log history). The first
`--warmup` steps are left out. Rounds: every point runs once per round (`--rounds`, at least 3), the points
interleaved (dpoc, TRL, dpoc, TRL, ... within each thread count and reference) and the order reversed every
other round, so a shared machine's load falls on both sides alike. Each point reports the median and the best
of its rounds; each side's best point is the one of highest median. Floors: dpoc's best median >= 1.5 x
TRL's, live and precomputed (the ratio of best rounds is printed beside it).

Model FLOPs: 6 N T per pair for the policy's forward and backward, plus 2 N T for a live reference's forward,
N = the matmul parameters (every linear layer and the LM head: 5.19 M), T = the pair's real tokens (both
sequences, unpadded); attention's score and value products are not included (they are reported beside:
4 x heads x head_dim x L^2 / 2 per causal sequence of L tokens, x3 for forward + backward). Beside them, the
FLOPs each side executes: dpoc projects only the positions that predict a response token through the LM head
(the other positions' log-probs are never read), so its LM-head share counts those positions only; TRL's
fused head scores every position on the CPU (its compact path needs Triton). The rates are at each point's
median and a fraction of this machine's fp32 matmul rate at the point's thread count, measured in the same
run (the best over rounds of square products of 1024, 2048 and 4096); beside it, the rate the model's own
products reach (every linear layer and the LM head, forward and both gradients, over one step's tokens),
which bounds what any runtime of this model can reach here. `--device cuda` runs both sides on the GPU (fp32;
bench/gpu_check.sh). `--smoke` trains a one-layer hidden-64 Qwen3 on the same vocabulary, one thread,
micro-batch 4, the matmul rate of 128 and 256 only (CI checks the bench runs, not its figures). Needs the
`bench` extra (trl, datasets).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._shared import arguments, best_seconds, square_matmul_rate, write_result  # noqa: E402

MODEL = dict(vocab_size=8000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=1_000_000.0,
             rms_norm_eps=1e-6, max_position_embeddings=512, tie_word_embeddings=False)
# --smoke: the same vocabulary (the same token ids), a model small enough for CI
SMOKE_MODEL = MODEL | dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=32)
EOS = MODEL["vocab_size"] - 1
STEP_PAIRS, LR, BETA, CLIP, SEED, SEQ_LENGTH = 8, 1e-5, 0.1, 1.0, 1234, 512
# step 1's policy log-probs and gradient norm, and the loss after the first update, agree this closely
AGREEMENT = {"logps/chosen": 1e-5, "logps/rejected": 1e-5, "grad_norm": 1e-3, "loss after one update": 1e-4}
MATMUL_SIZES = (1024, 2048, 4096)
SMOKE_MATMUL_SIZES = (128, 256)  # --smoke: its numbers mean nothing; the full sizes cost 8.6 s of CPU per round
REFERENCES = ("live", "precomputed")
FLOOR, MATMUL_FLOOR, MIN_ROUNDS = 1.5, 0.4, 3
WORKER_TIMEOUT_S = 1800
BACKEND = {"cpu": "gloo", "cuda": "nccl"}


# the code this benchmark measures: its results' provenance (bench/_shared.provenance)
MEASURES = ("bench/dpo_vs_trl.py", "dpoc/runtime", "dpoc/data")


@dataclass(frozen=True)
class Config:
    """One point of one side's sweep."""

    side: str  # dpoc | trl
    micro_batch: int  # pairs per micro-batch (accumulated to STEP_PAIRS); dpoc packed: the stream budget's pairs
    threads: int
    reference: str = "live"  # live | precomputed
    packing: bool = False  # dpoc: --dpoc-packing; TRL: padding_free=True

    @property
    def name(self) -> str:
        side = "dpoc" if self.side == "dpoc" else "TRL"
        if self.packing and self.side == "dpoc":
            layout = f"packed, budget 2 x {self.micro_batch} x {SEQ_LENGTH} tokens"
        else:
            accumulated = STEP_PAIRS // self.micro_batch
            layout = f"{'padding-free, ' * self.packing}micro-batch {self.micro_batch} x {accumulated}"
        return f"{side}, {self.reference} reference, {layout}, {self.threads} thread{'s' * (self.threads > 1)}"


def configurations(threads: list[int], micro_batches: list[int], budgets: list[int],
                   trl_padding_free: bool) -> list[Config]:
    """The same grid for both sides: every thread count, reference and micro-batch, and each side's own
    padding removal (TRL's only where the installed TRL honours it)."""
    points = []
    for t, reference in itertools.product(threads, REFERENCES):
        points += [Config("dpoc", m, t, reference) for m in micro_batches]
        points += [Config("dpoc", m, t, reference, packing=True) for m in budgets]
        points += [Config("trl", m, t, reference) for m in micro_batches]
        points += [Config("trl", m, t, reference, packing=True) for m in micro_batches if trl_padding_free]
    return points


def round_order(configs: list[Config], round_: int) -> list[Config]:
    """dpoc, TRL, dpoc, TRL, ... within each thread count and reference; reversed every other round."""
    order = []
    for key in dict.fromkeys((c.threads, c.reference) for c in configs):
        sides = [[c for c in configs if (c.threads, c.reference) == key and c.side == s] for s in ("dpoc", "trl")]
        order += [c for pair in itertools.zip_longest(*sides) for c in pair if c is not None]
    return order if round_ % 2 == 0 else order[::-1]


# --- the shared inputs: weights, pairs, the step order ---------------------------------------------------------

def make_pairs(count: int, seed: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids: prompts of 40-149 tokens, responses of 44-147 ending in EOS."""
    rng = np.random.RandomState(seed)
    pairs = []
    for _ in range(count):
        prompt = rng.randint(0, EOS, size=rng.randint(40, 150)).tolist()
        chosen = [*rng.randint(0, EOS, size=rng.randint(43, 147)).tolist(), EOS]
        rejected = [*rng.randint(0, EOS, size=rng.randint(43, 147)).tolist(), EOS]
        pairs.append((prompt, chosen, rejected))
    return pairs


def write_weights(directory: Path, model: dict) -> None:
    """The seeded random Qwen3 both sides start from, and the word-level tokenizer TRL reads ids through."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(SEED)
    Qwen3ForCausalLM(Qwen3Config(**model, eos_token_id=EOS, pad_token_id=EOS)).save_pretrained(directory)
    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(EOS)} | {"</s>": EOS}, unk_token="</s>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="</s>").save_pretrained(directory)


def write_indexed(prefix: Path, pairs) -> None:
    """dpoc's pairwise indexed dataset (what `dpoc preprocess` writes): labels -100 over the prompt."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from dpoc.data.pairwise import FIELDS, dataset_prefix
    from dpoc.runtime.step.data import IGNORE_INDEX

    builders = {f: IndexedDatasetBuilder(dataset_prefix(str(prefix), f) + ".bin", dtype=np.int32) for f in FIELDS}
    for prompt, chosen, rejected in pairs:
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            ids = np.asarray(prompt + response, dtype=np.int32)
            labels = ids.copy()
            labels[: len(prompt)] = IGNORE_INDEX
            for part, values in ((f"{side}_input_ids", ids), (f"{side}_labels", labels)):
                builders[part].add_item(torch.from_numpy(values))
                builders[part].end_document()
    for part, builder in builders.items():
        builder.finalize(dataset_prefix(str(prefix), part) + ".idx")


def step_order(prefix: Path, steps: int) -> list[list[int]]:
    """Each step's pairs in the order dpoc's unpacked micro-batches take them (`data.step_groups`)."""
    from dpoc.runtime.step.data import Batching, PairwiseDataset, step_groups

    dataset = PairwiseDataset(str(prefix), SEQ_LENGTH)
    batching = Batching(STEP_PAIRS, STEP_PAIRS, SEQ_LENGTH, SEED, multiple_of=1)
    return [[int(i) for g in step_groups(dataset, step, batching, 1) for i in g] for step in range(steps)]


def text(ids: list[int]) -> str:
    return "".join(f" w{i}" if i != EOS else "</s>" for i in ids)


@dataclass(frozen=True)
class Workspace:
    model: dict  # the Qwen3's shape
    weights: Path
    data: Path  # dpoc's dataset prefix
    trl_rows: Path  # TRL's dataset in dpoc's step order, with the token ids it must reproduce
    step_tokens: list[int]  # real tokens of each step's pairs (both sequences)
    step_predicted: list[int]  # of those, the positions that predict a response token (one per response token)
    attention_flops: list[float]  # causal score and value products of each step's sequences, forward only


def prepare(work: Path, count: int, steps: int, model: dict) -> Workspace:
    pairs = make_pairs(count, seed=0)
    write_weights(work / "hf-model", model)
    write_indexed(work / "pairs", pairs)
    order = step_order(work / "pairs", steps)
    rows = [pairs[i] for step in order for i in step]
    (work / "trl-rows.json").write_text(json.dumps({
        "prompt": [text(p).lstrip() for p, _, _ in rows], "chosen": [text(c) for _, c, _ in rows],
        "rejected": [text(r) for _, _, r in rows], "ids": rows}))
    per_token = 2 * model["num_attention_heads"] * model["head_dim"]  # q.k and p.v, multiply-adds as 2
    lengths = [[len(pairs[i][0]) + len(pairs[i][side]) for i in step for side in (1, 2)] for step in order]
    predicted = [sum(len(pairs[i][1]) + len(pairs[i][2]) for i in step) for step in order]
    return Workspace(model, work / "hf-model", work / "pairs", work / "trl-rows.json",
                     [sum(step) for step in lengths], predicted,
                     [sum(per_token * n * n for n in step) for step in lengths])  # causal: half of 2 L^2


def architecture(m: dict):
    from dpoc.contract import hf_config
    from dpoc.contract.architecture import Architecture

    return Architecture.of(hf_config.architecture({**m, "model_type": "qwen3"}, "bench"))


def lm_head_parameters(m: dict) -> int:
    from dpoc.planner.params import embedding_params

    return embedding_params(architecture(m))


def matmul_parameters(m: dict) -> int:
    """N: every linear layer's weights and the LM head (embedding lookups and norms are no matmuls)."""
    from dpoc.planner.params import matmul_params

    return matmul_params(architecture(m))


# --- running one point in a fresh process, timed by the one step clock -----------------------------------------

def worker_env(threads: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads),
            "TQDM_DISABLE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(command: list[str], config: Config) -> None:
    done = subprocess.run([sys.executable, *command], cwd=ROOT, env=worker_env(config.threads),
                          capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    if done.returncode:
        raise SystemExit(f"{config.name} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")


def dpoc_flags(config: Config, ws: Workspace, steps: int, run_dir: Path, device: str) -> list[tuple[str, object]]:
    """megatron.args as `dpoc build` writes them for this job: the model flags from the weights' config.json."""
    from dpoc.contract import hf_config

    arch = hf_config.architecture(hf_config.read_config(ws.weights, "--dpoc-hf-weights", "bench"), "bench")
    return [
        *hf_config.model_flags(arch),
        ("--dpoc-device", device), ("--distributed-backend", BACKEND[device]), ("--use-distributed-optimizer", True),
        ("--stage", "dpo"), ("--is-pairwise-dataset", True), ("--dpo-loss-type", "sigmoid"), ("--dpo-beta", BETA),
        ("--micro-batch-size", config.micro_batch), ("--global-batch-size", STEP_PAIRS),
        ("--seq-length", SEQ_LENGTH), ("--no-pad-to-seq-lengths", True), *[("--dpoc-packing", True)] * config.packing,
        ("--train-iters", steps), ("--lr", LR), ("--lr-decay-style", "constant"), ("--lr-warmup-iters", 0),
        ("--adam-beta1", 0.9), ("--adam-beta2", 0.999), ("--adam-eps", 1e-8), ("--weight-decay", 0.0),
        ("--clip-grad", CLIP), ("--seed", SEED), ("--data-path", str(ws.data)),
        ("--dpoc-init", "hf"), ("--dpoc-hf-weights", str(ws.weights)), ("--dpoc-run-dir", str(run_dir)),
        *[("--dpoc-reference", "precomputed"), ("--dpoc-reference-micro-batch-size", STEP_PAIRS)]
        * (config.reference == "precomputed"),
    ]


def run_point(config: Config, ws: Workspace, steps: int, work: Path, device: str,
              dpoc_extra: Sequence[tuple[str, object]] = (), script: str = __file__, **spec_extra: object) -> dict:
    """One point in its own worker process (dpoc's precompute pass first, in its own, timed whole). `script`'s
    `--worker` runs it (bench/lora.py's trains adapters), with `dpoc_extra` after dpoc's flags and `spec_extra`
    in the worker's spec."""
    spec = {"config": asdict(config), "steps": steps, "device": device, "out": str(work / "result.json"),
            "weights": str(ws.weights), "rows": str(ws.trl_rows), "output_dir": str(work / "trl-out"),
            "args_file": str(work / "megatron.args"), "run_dir": str(work / "run"), **spec_extra}
    precompute_s = None
    if config.side == "dpoc":
        from dpoc.contract.megatron_args import format_args

        flags = [*dpoc_flags(config, ws, steps, work / "run", device), *dpoc_extra]
        (work / "megatron.args").write_text(format_args(flags))
        if config.reference == "precomputed":  # the pass runs for every point: no earlier run's file
            for stale in ws.data.parent.glob(f"{ws.data.name}_reference-*.npz"):
                stale.unlink()
            started = time.perf_counter()
            _run(["-m", "dpoc.runtime.precompute", f"@{work / 'megatron.args'}"], config)
            precompute_s = time.perf_counter() - started  # the whole process, its start-up included
    (work / "spec.json").write_text(json.dumps(spec))
    _run([script, "--worker", str(work / "spec.json")], config)
    result = json.loads((work / "result.json").read_text())
    return {**result, "precompute_s": result["precompute_s"] or precompute_s}


def step_clock(device: str) -> list[float]:
    """The one clock both sides are timed by: perf_counter after every update of a torch optimizer (a wrapper
    such as accelerate's, not from torch.optim, is not counted twice); on cuda after a synchronize."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    marks: list[float] = []

    def mark(optimizer, args, kwargs) -> None:
        if type(optimizer).__module__.startswith("torch.optim."):
            if device == "cuda":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    register_optimizer_step_post_hook(mark)
    return marks


def worker(spec_file: str, trainers: dict[str, Callable[[Config, dict], dict]] | None = None) -> None:
    """One point of either side, in its own process: the same threads setting and the same clock for both, and
    the process's peak resident memory at the end (`trainers`: each side's training function)."""
    spec = json.loads(Path(spec_file).read_text())
    config = Config(**spec["config"])
    import torch

    torch.set_num_threads(config.threads)
    marks = step_clock(spec["device"])
    result = (trainers or {"dpoc": train_dpoc, "trl": train_trl})[config.side](config, spec)
    if len(marks) != spec["steps"]:
        raise SystemExit(f"{config.name}: the step clock saw {len(marks)} optimizer steps, not {spec['steps']}")
    # step_s[i]: optimizer step i + 2's period, from step i + 1's update to its own; ru_maxrss is in KiB on Linux
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(spec["out"]).write_text(json.dumps({**result, "step_s": np.diff(marks).tolist(), "peak_rss_bytes": peak_rss}))


def train_dpoc(config: Config, spec: dict) -> dict:
    """dpoc's training entry point as `python -m dpoc.runtime.train @megatron.args` runs it."""
    from dpoc.runtime.train import main as train_main

    code = train_main([f"@{spec['args_file']}"])
    if code:
        raise SystemExit(code)
    records = [json.loads(line) for line in (Path(spec["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return {"metrics": records, "fill": float(np.mean([r["fill"] for r in records])), "precompute_s": None}


def train_trl(config: Config, spec: dict, peft_config: object = None, adapter: dict | None = None) -> dict:
    """TRL's DPOTrainer on the same pairs in the same order, logging every step; with `peft_config` (a PEFT
    LoraConfig) it trains adapters, started from `adapter`'s tensors (PEFT's key names) when given."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    class TimedPrecompute(DPOTrainer):
        precompute_s = 0.0

        def _precompute_ref_logps(self, *args, **kwargs):
            started = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            self.precompute_s += time.perf_counter() - started
            return out

    rows = json.loads(Path(spec["rows"]).read_text())
    ids = rows.pop("ids")
    precompute = config.reference == "precomputed"
    args = DPOConfig(
        output_dir=spec["output_dir"], per_device_train_batch_size=config.micro_batch,
        gradient_accumulation_steps=STEP_PAIRS // config.micro_batch, max_steps=spec["steps"],
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=CLIP, beta=BETA, loss_type=["sigmoid"],
        max_length=1024, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=spec["device"] == "cpu",
        model_init_kwargs={"dtype": "float32"}, disable_dropout=True, padding_free=config.packing,
        precompute_ref_log_probs=precompute, precompute_ref_batch_size=STEP_PAIRS if precompute else None,
        train_sampling_strategy="sequential", dataloader_num_workers=0, logging_steps=1, report_to=[],
        save_strategy="no", seed=SEED)
    trainer = TimedPrecompute(model=spec["weights"], args=args, train_dataset=Dataset.from_dict(rows),
                              processing_class=AutoTokenizer.from_pretrained(spec["weights"]),
                              peft_config=peft_config)
    if adapter is not None:  # after the precompute pass, which runs the base (B is zero: the same log-probs)
        from peft import set_peft_model_state_dict

        loaded = set_peft_model_state_dict(trainer.model, adapter)
        if loaded.unexpected_keys or any("lora_" in k for k in loaded.missing_keys):
            raise SystemExit(f"the initial adapter does not fit TRL's model: {loaded}")
    seen = trainer.train_dataset
    if [[p, c, r] for p, c, r in zip(seen["prompt_ids"], seen["chosen_ids"], seen["rejected_ids"], strict=True)] \
            != ids:
        raise SystemExit("TRL's tokenized pairs differ from dpoc's token ids")
    if precompute and not trainer.precompute_s:
        raise SystemExit("TRL's precompute pass was not timed (DPOTrainer._precompute_ref_logps renamed?)")
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return {"precompute_s": trainer.precompute_s or None, "fill": None,
            "metrics": [{"loss": h["loss"], "grad_norm": h["grad_norm"], "logps/chosen": h["logps/chosen"],
                         "logps/rejected": h["logps/rejected"]} for h in logged],
            "optimizer": args.optim, "attention": trainer.model.config._attn_implementation}


def trl_padding_free_probe(ws: Workspace, work: Path, device: str) -> dict:
    """Whether the installed TRL honours `padding_free=True` (1.16 logs that it is disabled and pads): asked of
    the trainer, with what it logged about it."""
    code = f"""
import json
from datasets import Dataset
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer
rows = json.loads(open({str(ws.trl_rows)!r}).read()); rows.pop("ids")
rows = {{k: v[:{STEP_PAIRS}] for k, v in rows.items()}}
trainer = DPOTrainer(model={str(ws.weights)!r}, train_dataset=Dataset.from_dict(rows),
                     processing_class=AutoTokenizer.from_pretrained({str(ws.weights)!r}),
                     args=DPOConfig(output_dir={str(work / "probe")!r}, padding_free=True, use_cpu={device == "cpu"},
                                    bf16=False, report_to=[], max_steps=1))
print(json.dumps({{"requested": True, "trainer_padding_free": trainer.padding_free}}))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=worker_env(1), capture_output=True,
                          text=True, timeout=WORKER_TIMEOUT_S)
    if done.returncode:
        raise SystemExit(f"the padding_free probe failed:\n{(done.stdout + done.stderr)[-3000:]}")
    said = [line.strip() for line in done.stderr.splitlines() if "padding_free" in line]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "logged": said[:1]}


def matmul_rate(threads: int, device: str, sizes: tuple[int, ...] = MATMUL_SIZES) -> dict[str, float]:
    """This machine's fp32 matmul FLOP/s at `threads` threads: the best of a few square products per size."""
    import torch

    torch.set_num_threads(threads)
    return {str(n): square_matmul_rate(n, 3 if n >= 4096 else 8, device) for n in sizes}


def model_shapes_rate(model: dict, tokens: int, threads: int, device: str) -> float:
    """FLOP/s of the model's own products (every linear layer and the LM head: forward, input gradient and
    weight gradient) over a stream of `tokens` tokens: the most the model's matmuls reach on this machine, a
    bound below the square products' rate (their inner dimension is the hidden size)."""
    import torch

    torch.set_num_threads(threads)
    m = model
    q, kv = m["num_attention_heads"] * m["head_dim"], m["num_key_value_heads"] * m["head_dim"]
    h, f = m["hidden_size"], m["intermediate_size"]
    layer = [(q + 2 * kv, h), (h, q), (2 * f, h), (h, f)]  # (out, in): qkv, attention out, gate+up, down
    shapes = layer * m["num_hidden_layers"] + [(m["vocab_size"], h)]
    tensors = [tuple(torch.randn(*s, device=device) for s in ((tokens, i), (o, i), (tokens, o))) for o, i in shapes]

    def products():
        for x, w, g in tensors:
            x @ w.t(), g @ w, g.t() @ x

    return sum(6 * tokens * o * i for o, i in shapes) / best_seconds(products, 3, device)


# --- the sweep and the comparison -----------------------------------------------------------------------------

def agreement(result: dict, baseline: dict) -> dict[str, float]:
    """Relative differences from the baseline run on step 1 (before any update: both sides' models are the same
    weights) and on the loss after the first update."""
    first, base = result["metrics"][0], baseline["metrics"][0]
    diffs = {k: abs(first[k] - base[k]) / abs(base[k]) for k in ("logps/chosen", "logps/rejected", "grad_norm")}
    diffs["loss after one update"] = abs(result["metrics"][1]["loss"] - baseline["metrics"][1]["loss"])
    return diffs


def round_rates(results: list[dict], warmup: int) -> list[float]:
    """Each round's pairs/s over its timed steps (the first `warmup` left out)."""
    return [STEP_PAIRS * len(r["step_s"][warmup - 1:]) / sum(r["step_s"][warmup - 1:]) for r in results]


def summarise(config: Config, results: list[dict], ws: Workspace, warmup: int, peak: float) -> dict:
    """The point's median and best round in pairs/s over its timed steps, and its FLOPs rates at the median."""
    n = matmul_parameters(ws.model)
    flops_per_param = 8 if config.reference == "live" else 6  # per token: policy 6, a live reference's forward 2
    attention_factor = 4 if config.reference == "live" else 3  # forward + backward = 3 forwards, + 1 reference
    timed_steps = range(warmup, len(ws.step_tokens))  # step_s[s - 1] is step s's period (0-based s)
    rates = round_rates(results, warmup)
    median = statistics.median(rates)
    seconds = STEP_PAIRS * len(timed_steps) / median
    model_flops = sum(flops_per_param * n * ws.step_tokens[s] for s in timed_steps) / seconds
    # what the side really multiplies: dpoc projects only the predicted positions through the LM head; TRL's
    # head on the CPU scores every position (its compact path needs Triton)
    unread = sum(ws.step_tokens[s] - ws.step_predicted[s] for s in timed_steps) if config.side == "dpoc" else 0
    executed = model_flops - flops_per_param * lm_head_parameters(ws.model) * unread / seconds
    attention = sum(attention_factor * ws.attention_flops[s] for s in timed_steps) / seconds
    precomputes = [r["precompute_s"] for r in results if r["precompute_s"]]
    return {
        "configuration": config.name, **asdict(config), "pairs_per_s_median": median,
        "pairs_per_s_best": max(rates), "pairs_per_s_every_round": rates,
        "step_s_every_round": [r["step_s"] for r in results],
        "model_flops_per_s": model_flops, "model_flops_fraction_of_matmul_rate": model_flops / peak,
        "executed_flops_per_s": executed, "executed_fraction_of_matmul_rate": executed / peak,
        "attention_flops_per_s": attention,
        "with_attention_fraction_of_matmul_rate": (model_flops + attention) / peak,
        "precompute_s_median": statistics.median(precomputes) if precomputes else None,
        "fill": results[0]["fill"], "first_steps": results[0]["metrics"][:2],
        **{k: results[0][k] for k in ("optimizer", "attention") if k in results[0]},
    }


def _best(rows: list[dict], side: str, reference: str, key: str = "pairs_per_s_median") -> dict:
    return max((r for r in rows if r["side"] == side and r["reference"] == reference), key=lambda r: r[key])


def comparison(rows: list[dict]) -> dict:
    """Each side's best point (highest median) per reference, over every thread count and at each, against the
    floor; and the ratio of the two sides' best rounds beside it."""
    out: dict[str, dict] = {}
    for reference in REFERENCES:
        dpoc, trl = _best(rows, "dpoc", reference), _best(rows, "trl", reference)
        at = {}
        for threads in sorted({r["threads"] for r in rows}):
            same = [r for r in rows if r["threads"] == threads]
            at[str(threads)] = _best(same, "dpoc", reference)["pairs_per_s_median"] \
                / _best(same, "trl", reference)["pairs_per_s_median"]
        out[reference] = {
            "dpoc_best": dpoc["configuration"], "trl_best": trl["configuration"],
            "dpoc_pairs_per_s_median": dpoc["pairs_per_s_median"], "trl_pairs_per_s_median": trl["pairs_per_s_median"],
            "dpoc_over_trl": dpoc["pairs_per_s_median"] / trl["pairs_per_s_median"],
            "dpoc_over_trl_best_rounds": _best(rows, "dpoc", reference, "pairs_per_s_best")["pairs_per_s_best"]
            / _best(rows, "trl", reference, "pairs_per_s_best")["pairs_per_s_best"],
            "dpoc_over_trl_at_threads": at, "floor": FLOOR,
        }
    fastest = max((r for r in rows if r["side"] == "dpoc"), key=lambda r: r["model_flops_fraction_of_matmul_rate"])
    out["matmul_rate"] = {"dpoc_best": fastest["configuration"],
                          "fraction": fastest["model_flops_fraction_of_matmul_rate"], "floor": MATMUL_FLOOR,
                          "executed_fraction": fastest["executed_fraction_of_matmul_rate"]}
    for value in out.values():
        value["met"] = value.get("dpoc_over_trl", value.get("fraction")) >= value["floor"]
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__.splitlines()[0], "dpo_vs_trl")
    parser.add_argument("--pairs", type=int, default=256, help="dataset size (--smoke: 16)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run (--smoke: 3)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing, at least 1 "
                        "(--smoke: 1)")
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS, help=f"each point runs once per round; at "
                        f"least {MIN_ROUNDS} (--smoke: 1)")
    parser.add_argument("--threads", type=_ints, default=[1, 2], help="thread counts swept, for both sides "
                        "(--smoke: 1)")
    parser.add_argument("--micro-batches", type=_ints, default=[8, 4, 2, 1], help="micro-batches swept, for both "
                        "sides, accumulating to 8 pairs (--smoke: 4)")
    parser.add_argument("--packed", type=_ints, default=[8, 2], help="dpoc's packed budgets, in pairs of "
                        "2 x seq_length tokens (--smoke: 4)")
    parser.add_argument("--device", choices=sorted(BACKEND), default="cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.smoke:
        args.pairs, args.steps, args.warmup, args.rounds = 16, 3, 1, 1
        args.threads, args.micro_batches, args.packed = [1], [4], [4]
    elif args.rounds < MIN_ROUNDS or args.warmup < 1 or args.steps <= args.warmup:
        parser.error(f"--rounds must be at least {MIN_ROUNDS}, --warmup at least 1 and --steps above --warmup")
    uptime_before, load_before = _uptime(), os.getloadavg()
    results: dict[Config, list[dict]] = {}
    rates: dict[str, list[dict[str, float]]] = {str(t): [] for t in args.threads}
    shaped: dict[str, list[float]] = {str(t): [] for t in args.threads}
    checks: dict[str, dict[str, float]] = {}
    baseline = None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ws = prepare(tmp, args.pairs, args.steps, SMOKE_MODEL if args.smoke else MODEL)
        padding_free = trl_padding_free_probe(ws, tmp, args.device)
        configs = configurations(args.threads, args.micro_batches, args.packed, padding_free["trainer_padding_free"])
        results = {c: [] for c in configs}
        for round_ in range(args.rounds):
            for t in args.threads:
                rates[str(t)].append(matmul_rate(t, args.device, SMOKE_MATMUL_SIZES if args.smoke else MATMUL_SIZES))
                shaped[str(t)].append(model_shapes_rate(ws.model, max(ws.step_tokens), t, args.device))
            for config in round_order(configs, round_):
                work = tmp / f"round{round_}-point{configs.index(config)}"
                work.mkdir()
                result = run_point(config, ws, args.steps, work, args.device)
                baseline = baseline or result
                checks[config.name] = agreement(result, baseline)
                results[config].append(result)
                timed = result["step_s"][args.warmup - 1:]
                print(f"round {round_ + 1}: {config.name:72s} {STEP_PAIRS * len(timed) / sum(timed):6.2f} pairs/s",
                      flush=True)
    peaks = {t: max(max(r.values()) for r in every) for t, every in rates.items()}
    rows = [summarise(c, results[c], ws, args.warmup, peaks[str(c.threads)]) for c in configs]
    worst = {k: max(c[k] for c in checks.values()) for k in AGREEMENT}
    compared = comparison(rows)
    print_table(rows, compared, peaks)
    for t, every in shaped.items():
        print(f"the model's own products reach {max(every) / 1e9:.1f} GFLOP/s at {t} thread(s) "
              f"({100 * max(every) / peaks[t]:.0f}% of the square products' rate) over {max(ws.step_tokens)} tokens")
    summary = {
        "setup": {"model": ws.model, "matmul_parameters": matmul_parameters(ws.model), "pairs": args.pairs,
                  "step_pairs": STEP_PAIRS, "steps": args.steps, "warmup_steps_left_out": args.warmup,
                  "rounds": args.rounds, "threads": args.threads, "micro_batches": args.micro_batches,
                  "dpoc_packed_budgets": args.packed, "device": args.device, "seq_length": SEQ_LENGTH, "lr": LR,
                  "beta": BETA, "clip_grad": CLIP, "trl_padding_free": padding_free,
                  "timer": "one global torch optimizer step post-hook in both workers; step = update to update, "
                           "per-step logging included on both sides",
                  "uptime_before": uptime_before, "uptime_after": _uptime(),
                  "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "matmul_flops_per_s": {"best": peaks, "every_round": rates,
                               "model_shapes_best": {t: max(v) for t, v in shaped.items()},
                               "model_shapes_every_round": shaped, "model_shapes_tokens": max(ws.step_tokens)},
        "configurations": rows,
        "comparison": compared,
        "agreement": {"worst_relative_difference": worst, "tolerance": AGREEMENT, "per_configuration": checks},
    }
    return finish(args, "dpo_vs_trl", summary, MEASURES, worst, AGREEMENT)


def finish(args: argparse.Namespace, name: str, summary: dict, measures: Sequence[str], worst: dict[str, float],
           tolerance: dict[str, float]) -> int:
    """Write the result (it records the agreement either way), then exit 1 where the two sides disagree."""
    out = write_result(args, name, summary, measures)
    failed = [k for k, v in worst.items() if v > tolerance[k]]
    if failed:
        print(f"the two sides disagree on {', '.join(failed)}: {worst}", file=sys.stderr)
        return 1
    print(f"written {out}" if out else "smoke run: no result written")
    return 0


def print_table(rows: list[dict], compared: dict, peaks: dict[str, float]) -> None:
    print(f"\n{'point':72s} {'median':>7s} {'best':>6s} {'rounds':>20s} {'model FLOPs':>11s} {'executed':>9s}"
          "  precompute")
    for r in rows:
        rounds = " ".join(f"{x:.2f}" for x in r["pairs_per_s_every_round"])
        pre = f"{r['precompute_s_median']:.1f} s" if r["precompute_s_median"] else ""
        print(f"{r['configuration']:72s} {r['pairs_per_s_median']:7.2f} {r['pairs_per_s_best']:6.2f} {rounds:>20s} "
              f"{100 * r['model_flops_fraction_of_matmul_rate']:10.1f}% "
              f"{100 * r['executed_fraction_of_matmul_rate']:8.1f}%  {pre}")
    print("fp32 matmul rate " + ", ".join(f"{p / 1e9:.1f} GFLOP/s at {t} thread(s)" for t, p in peaks.items()))
    for reference in REFERENCES:
        c = compared[reference]
        at = ", ".join(f"{x:.2f}x at {t} thread(s)" for t, x in c["dpoc_over_trl_at_threads"].items())
        print(f"{reference}: {c['dpoc_best']} ({c['dpoc_pairs_per_s_median']:.2f}) / {c['trl_best']} "
              f"({c['trl_pairs_per_s_median']:.2f}) = {c['dpoc_over_trl']:.2f}x in medians (floor {FLOOR}x: "
              f"{'met' if c['met'] else 'NOT met'}); best rounds {c['dpoc_over_trl_best_rounds']:.2f}x; {at}")
    m = compared["matmul_rate"]
    print(f"dpoc's best at {100 * m['fraction']:.1f}% of the matmul rate in model FLOPs (floor {MATMUL_FLOOR:.0%}: "
          f"{'met' if m['met'] else 'NOT met'}); {100 * m['executed_fraction']:.1f}% in the FLOPs it executes")


if __name__ == "__main__":
    sys.exit(main())
