"""Pairs/s of the dpoc runtime vs TRL's DPOTrainer, best against best, on the same weights and token ids (CPU, fp32).

    python bench/dpo_vs_trl.py [--pairs 256 --steps 6 --warmup 2 --rounds 2 --threads 2] [--smoke] [--out FILE.json]

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

Each side's own knobs are swept; every configuration runs in a fresh process, once per round, the order
reversed every other round (the machine is shared), and keeps its best round:
  - dpoc: micro-batch 8 / 4 / 2 (accumulating to 8), padded to each micro-batch's longest pair; packing
    (`--dpoc-packing`: pairs share token streams of 2 x micro-batch x seq_length tokens; seq_length 512).
  - TRL: micro-batch 8 / 4 / 2 with gradient accumulation. `padding_free=True` is no configuration of its
    own: TRL 1.16 warns and falls back to padding (the JSON records what the trainer reported).
  - reference: live on both; precomputed on both (TRL `precompute_ref_log_probs=True`, its pass at 8 pairs per
    batch; dpoc `--dpoc-reference precomputed`, its pass `python -m dpoc.runtime.precompute` at 8 pairs per
    micro-batch, run as soon as the runtime has that module — the JSON says when it does not).
Live is compared with live and precomputed with precomputed; step times never include a precompute pass,
which is timed on its own and reported.

Threads: both sides get the same `--threads` (OMP_NUM_THREADS and torch.set_num_threads in each worker).
Step time: dpoc's own (batch building through the optimizer step and the metrics all-reduce, as its
metrics.jsonl reports it); TRL's is the wall clock between the ends of consecutive optimizer steps (a
callback), so it holds everything the trainer's loop does per step. The first `--warmup` steps are left out.

Model FLOPs: 6 N T per pair for the policy's forward and backward, plus 2 N T for a live reference's forward,
N = the matmul parameters (every linear layer and the LM head: 5.19 M), T = the pair's real tokens (both
sequences, unpadded); attention's score and value products are not included (they are reported beside:
4 x heads x head_dim x L^2 / 2 per causal sequence of L tokens, x3 for forward + backward). Beside them, the
FLOPs each side executes: dpoc projects only the positions that predict a response token through the LM head
(the other positions' log-probs are never read), so its LM-head share counts those positions only; TRL's
fused head scores every position on the CPU (its compact path needs Triton). The rate is a
fraction of this machine's fp32 matmul rate measured in the same run (the best of square products of 1024,
2048 and 4096 at the same thread count); beside it, the rate the model's own products reach (every linear
layer and the LM head, forward and both gradients, over one step's tokens), which bounds what any runtime of
this model can reach here. `--smoke` trains a one-layer hidden-64 Qwen3 on the same vocabulary
(CI checks the bench runs, not its figures). Needs the `bench` extra (trl, datasets).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
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
WORKER_TIMEOUT_S = 1800
# the runtime's `dpo.reference: precomputed` (its pass: `python -m dpoc.runtime.precompute @megatron.args`)
DPOC_PRECOMPUTED = importlib.util.find_spec("dpoc.runtime.precompute") is not None


# the code this benchmark measures: its results' provenance (bench/_shared.provenance)
MEASURES = ("bench/dpo_vs_trl.py", "dpoc/runtime", "dpoc/data")


@dataclass(frozen=True)
class Config:
    """One configuration of one side: what its own knobs are set to."""

    side: str  # dpoc | trl
    micro_batch: int  # pairs per micro-batch (accumulated to STEP_PAIRS); packed: the stream budget's pairs
    reference: str = "live"  # live | precomputed
    packing: bool = False  # dpoc only

    @property
    def name(self) -> str:
        side = "dpoc" if self.side == "dpoc" else "TRL"
        if self.packing:
            layout = f"packed, budget 2 x {self.micro_batch} x {SEQ_LENGTH} tokens"
        else:
            layout = f"micro-batch {self.micro_batch} x {STEP_PAIRS // self.micro_batch}"
        return f"{side}, {self.reference} reference, {layout}"


def configurations(smoke: bool, dpoc_precomputed: bool) -> list[Config]:
    if smoke:
        return [Config("dpoc", 4), Config("dpoc", 4, packing=True), Config("trl", 4), Config("trl", 4, "precomputed"),
                *[Config("dpoc", 4, "precomputed", packing=True)] * dpoc_precomputed]
    dpoc = [*(Config("dpoc", m) for m in (8, 4, 2)), *(Config("dpoc", m, packing=True) for m in (8, 2))]
    trl = [Config("trl", m) for m in (8, 4, 2)]
    precomputed = [Config("trl", m, "precomputed") for m in (8, 4, 2)]
    if dpoc_precomputed:
        precomputed += [Config(c.side, c.micro_batch, "precomputed", c.packing) for c in dpoc]
    return dpoc + trl + precomputed


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


# --- running one configuration in a fresh process ------------------------------------------------------------

def worker_env(threads: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads),
            "TQDM_DISABLE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _check(done: subprocess.CompletedProcess, config: Config) -> None:
    if done.returncode:
        raise SystemExit(f"{config.name} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")


def dpoc_flags(config: Config, ws: Workspace, steps: int, run_dir: Path) -> list[tuple[str, object]]:
    """megatron.args as `dpoc build` writes them for this job: the model flags from the weights' config.json."""
    from dpoc.contract import hf_config

    arch = hf_config.architecture(hf_config.read_config(ws.weights, "--dpoc-hf-weights", "bench"), "bench")
    return [
        *hf_config.model_flags(arch),
        ("--dpoc-device", "cpu"), ("--distributed-backend", "gloo"), ("--use-distributed-optimizer", True),
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


def run_dpoc(config: Config, ws: Workspace, steps: int, threads: int, work: Path) -> dict:
    from dpoc.contract.megatron_args import format_args

    args_file = work / "megatron.args"
    args_file.write_text(format_args(dpoc_flags(config, ws, steps, work / "run")))
    precompute_s = None
    if config.reference == "precomputed":  # the pass runs for every configuration: no earlier run's file
        for stale in ws.data.parent.glob(f"{ws.data.name}_reference-*.npz"):
            stale.unlink()
        started = time.perf_counter()
        _check(_module(["dpoc.runtime.precompute", f"@{args_file}"], threads), config)
        precompute_s = time.perf_counter() - started  # the whole process, its start-up included
    _check(_module(["dpoc.runtime.train", f"@{args_file}"], threads), config)
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"step_s": [STEP_PAIRS / r["samples_per_s"] for r in records], "metrics": records,
            "fill": float(np.mean([r["fill"] for r in records])), "precompute_s": precompute_s}


def _module(argv: list[str], threads: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=worker_env(threads), capture_output=True,
                          text=True, timeout=WORKER_TIMEOUT_S)


def run_trl(config: Config, ws: Workspace, steps: int, threads: int, work: Path) -> dict:
    spec = {"config": asdict(config), "weights": str(ws.weights), "rows": str(ws.trl_rows), "steps": steps,
            "threads": threads, "out": str(work / "result.json"), "output_dir": str(work / "trl-out")}
    (work / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, __file__, "--trl-worker", str(work / "spec.json")], cwd=ROOT,
                          env=worker_env(threads), capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    _check(done, config)
    return json.loads((work / "result.json").read_text())


def trl_worker(spec_file: str) -> None:
    """Train one TRL configuration (in its own process) and write its step times and logged metrics."""
    spec = json.loads(Path(spec_file).read_text())
    config = Config(**spec["config"])
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepEnds(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_begin(self, *args, **kwargs):
            self.times.append(time.perf_counter())

        def on_step_end(self, *args, **kwargs):
            self.times.append(time.perf_counter())

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
        max_length=1024, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        model_init_kwargs={"dtype": "float32"}, disable_dropout=True, padding_free=False,
        precompute_ref_log_probs=precompute, precompute_ref_batch_size=STEP_PAIRS if precompute else None,
        train_sampling_strategy="sequential", dataloader_num_workers=0, logging_steps=1, report_to=[],
        save_strategy="no", seed=SEED)
    clock = StepEnds()
    trainer = TimedPrecompute(model=spec["weights"], args=args, train_dataset=Dataset.from_dict(rows),
                              processing_class=AutoTokenizer.from_pretrained(spec["weights"]), callbacks=[clock])
    seen = trainer.train_dataset
    if [[p, c, r] for p, c, r in zip(seen["prompt_ids"], seen["chosen_ids"], seen["rejected_ids"], strict=True)] \
            != ids:
        raise SystemExit("TRL's tokenized pairs differ from dpoc's token ids")
    if precompute and not trainer.precompute_s:
        raise SystemExit("TRL's precompute pass was not timed (DPOTrainer._precompute_ref_logps renamed?)")
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    Path(spec["out"]).write_text(json.dumps({
        "step_s": np.diff(clock.times).tolist(), "precompute_s": trainer.precompute_s or None,
        "metrics": [{"loss": h["loss"], "grad_norm": h["grad_norm"], "logps/chosen": h["logps/chosen"],
                     "logps/rejected": h["logps/rejected"]} for h in logged],
        "optimizer": args.optim, "attention": trainer.model.config._attn_implementation,
        "fill": None}))


def trl_padding_free_probe(ws: Workspace, work: Path) -> dict:
    """What TRL does with `padding_free=True` (1.16: warns and falls back to padding): asked of the trainer."""
    code = f"""
import json, warnings
from datasets import Dataset
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer
rows = json.loads(open({str(ws.trl_rows)!r}).read()); rows.pop("ids")
rows = {{k: v[:{STEP_PAIRS}] for k, v in rows.items()}}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    trainer = DPOTrainer(model={str(ws.weights)!r}, train_dataset=Dataset.from_dict(rows),
                         processing_class=AutoTokenizer.from_pretrained({str(ws.weights)!r}),
                         args=DPOConfig(output_dir={str(work / "probe")!r}, padding_free=True, use_cpu=True,
                                        bf16=False, report_to=[], max_steps=1))
said = [str(w.message) for w in caught if "padding_free" in str(w.message)]
print(json.dumps({{"requested": True, "trainer_padding_free": trainer.padding_free, "warning": said[:1]}}))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=worker_env(1), capture_output=True,
                          text=True, timeout=WORKER_TIMEOUT_S)
    if done.returncode:
        raise SystemExit(f"the padding_free probe failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def matmul_rate(threads: int) -> dict[str, float]:
    """This machine's fp32 matmul FLOP/s at `threads` threads: the best of a few square products per size."""
    import torch

    torch.set_num_threads(threads)
    return {str(n): square_matmul_rate(n, 3 if n >= 4096 else 8) for n in MATMUL_SIZES}


def model_shapes_rate(model: dict, tokens: int, threads: int) -> float:
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
    tensors = [(torch.randn(tokens, i), torch.randn(o, i), torch.randn(tokens, o)) for o, i in shapes]

    def products():
        for x, w, g in tensors:
            x @ w.t(), g @ w, g.t() @ x

    return sum(6 * tokens * o * i for o, i in shapes) / best_seconds(products, 3)


# --- the sweep and the comparison -----------------------------------------------------------------------------

def agreement(result: dict, baseline: dict) -> dict[str, float]:
    """Relative differences from the baseline run on step 1 (before any update: both sides' models are the same
    weights) and on the loss after the first update."""
    first, base = result["metrics"][0], baseline["metrics"][0]
    diffs = {k: abs(first[k] - base[k]) / abs(base[k]) for k in ("logps/chosen", "logps/rejected", "grad_norm")}
    diffs["loss after one update"] = abs(result["metrics"][1]["loss"] - baseline["metrics"][1]["loss"])
    return diffs


def summarise(config: Config, results: list[dict], ws: Workspace, warmup: int, peak: float) -> dict:
    """The configuration's best round: pairs/s over its timed steps, and its model-FLOPs rate."""
    n = matmul_parameters(ws.model)
    flops_per_param = 8 if config.reference == "live" else 6  # per token: policy 6, a live reference's forward 2
    per_token = flops_per_param * n
    attention_factor = 4 if config.reference == "live" else 3  # forward + backward = 3 forwards, + 1 reference

    def rate(r):
        timed = r["step_s"][warmup:]
        return STEP_PAIRS * len(timed) / sum(timed)

    best = max(results, key=rate)
    timed_steps = range(warmup, len(best["step_s"]))
    seconds = sum(best["step_s"][warmup:])
    model_flops = sum(per_token * ws.step_tokens[s] for s in timed_steps) / seconds
    # what the side really multiplies: dpoc projects only the predicted positions through the LM head; TRL's
    # head on the CPU scores every position (its compact path needs Triton)
    unread = sum(ws.step_tokens[s] - ws.step_predicted[s] for s in timed_steps) if config.side == "dpoc" else 0
    executed = model_flops - flops_per_param * lm_head_parameters(ws.model) * unread / seconds
    attention = sum(attention_factor * ws.attention_flops[s] for s in timed_steps) / seconds
    return {
        "configuration": config.name, **asdict(config), "pairs_per_s": rate(best),
        "pairs_per_s_every_round": [rate(r) for r in results], "step_s": best["step_s"],
        "model_flops_per_s": model_flops, "model_flops_fraction_of_matmul_rate": model_flops / peak,
        "executed_flops_per_s": executed, "executed_fraction_of_matmul_rate": executed / peak,
        "attention_flops_per_s": attention,
        "with_attention_fraction_of_matmul_rate": (model_flops + attention) / peak,
        "precompute_s": best["precompute_s"], "fill": best["fill"],
        "first_steps": best["metrics"][:2],
        **{k: best[k] for k in ("optimizer", "attention") if k in best},
    }


def best_of(rows: list[dict], side: str, reference: str) -> dict | None:
    mine = [r for r in rows if r["side"] == side and r["reference"] == reference]
    return max(mine, key=lambda r: r["pairs_per_s"]) if mine else None


def comparison(rows: list[dict]) -> dict:
    out = {}
    for reference in ("live", "precomputed"):
        dpoc, trl = best_of(rows, "dpoc", reference), best_of(rows, "trl", reference)
        out[reference] = {
            "dpoc_best": dpoc and dpoc["configuration"], "trl_best": trl and trl["configuration"],
            "dpoc_over_trl": dpoc["pairs_per_s"] / trl["pairs_per_s"] if dpoc and trl else None,
            "floor": 1.5,
        }
    dpoc_rows = [r for r in rows if r["side"] == "dpoc"]
    fastest = max(dpoc_rows, key=lambda r: r["pairs_per_s"])
    out["matmul_rate"] = {"dpoc_best": fastest["configuration"],
                          "fraction": fastest["model_flops_fraction_of_matmul_rate"], "floor": 0.4,
                          "executed_fraction": fastest["executed_fraction_of_matmul_rate"]}
    for value in out.values():
        ratio = value.get("dpoc_over_trl", value.get("fraction"))
        value["met"] = None if ratio is None else ratio >= value["floor"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__.splitlines()[0], "dpo_vs_trl")
    parser.add_argument("--pairs", type=int, default=256, help="dataset size (--smoke: 16)")
    parser.add_argument("--steps", type=int, default=6, help="steps per run (--smoke: 3)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing (--smoke: 1)")
    parser.add_argument("--rounds", type=int, default=2, help="each configuration runs once per round; its best "
                        "round is kept (--smoke: 1)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both sides "
                        "(default: every core)")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_worker:
        trl_worker(args.trl_worker)
        return 0
    if args.smoke:
        args.pairs, args.steps, args.warmup, args.rounds = 16, 3, 1, 1
    threads = args.threads
    configs = configurations(args.smoke, DPOC_PRECOMPUTED)
    results: dict[Config, list[dict]] = {c: [] for c in configs}
    rates: list[dict[str, float]] = []
    shaped: list[float] = []
    checks: dict[str, dict[str, float]] = {}
    baseline = None
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ws = prepare(tmp, args.pairs, args.steps, SMOKE_MODEL if args.smoke else MODEL)
        padding_free = trl_padding_free_probe(ws, tmp)
        for round_ in range(args.rounds):  # the order reverses every other round: a shared machine's load
            rates.append(matmul_rate(threads))  # hits every configuration alike
            shaped.append(model_shapes_rate(ws.model, max(ws.step_tokens), threads))
            for number, config in (list(enumerate(configs)) if round_ % 2 == 0 else list(enumerate(configs))[::-1]):
                work = tmp / f"round{round_}-config{number}"
                work.mkdir()
                run = run_dpoc if config.side == "dpoc" else run_trl
                result = run(config, ws, args.steps, threads, work)
                baseline = baseline or result
                checks[config.name] = agreement(result, baseline)
                results[config].append(result)
                timed = result["step_s"][args.warmup:]
                print(f"round {round_ + 1}: {config.name:64s} {STEP_PAIRS * len(timed) / sum(timed):6.2f} pairs/s",
                      flush=True)
    peak = max(max(r.values()) for r in rates)
    rows = [summarise(c, results[c], ws, args.warmup, peak) for c in configs]
    worst = {k: max(c[k] for c in checks.values()) for k in AGREEMENT}
    compared = comparison(rows)
    print_table(rows, compared, peak, threads)
    print(f"the model's own products reach {max(shaped) / 1e9:.1f} GFLOP/s ({100 * max(shaped) / peak:.0f}% of "
          f"the square products' rate) over {max(ws.step_tokens)} tokens")
    summary = {
        "setup": {"model": ws.model, "matmul_parameters": matmul_parameters(ws.model), "pairs": args.pairs,
                  "step_pairs": STEP_PAIRS, "steps": args.steps, "warmup_steps_left_out": args.warmup,
                  "rounds": args.rounds, "threads": threads, "seq_length": SEQ_LENGTH, "lr": LR, "beta": BETA,
                  "clip_grad": CLIP, "load_average": os.getloadavg(),
                  "dpoc_precomputed_reference": DPOC_PRECOMPUTED or "not in the dpoc runtime yet",
                  "trl_padding_free": padding_free},
        "matmul_flops_per_s": {"best": peak, "every_round": rates, "model_shapes_best": max(shaped),
                               "model_shapes_every_round": shaped,
                               "model_shapes_tokens": max(ws.step_tokens)},
        "configurations": rows,
        "comparison": compared,
        "agreement": {"worst_relative_difference": worst, "tolerance": AGREEMENT, "per_configuration": checks},
    }
    out = write_result(args, "dpo_vs_trl", summary, MEASURES)
    failed = [k for k, v in worst.items() if v > AGREEMENT[k]]
    if failed:
        print(f"the two sides disagree on {', '.join(failed)}: {worst}", file=sys.stderr)
        return 1
    print(f"written {out}" if out else "smoke run: no result written")
    return 0


def print_table(rows: list[dict], compared: dict, peak: float, threads: int) -> None:
    print(f"\n{'configuration':64s} {'pairs/s':>8s} {'rounds':>14s} {'model FLOPs':>11s} {'executed':>9s}  precompute")
    for r in rows:
        rounds = " ".join(f"{x:.2f}" for x in r["pairs_per_s_every_round"])
        pre = f"{r['precompute_s']:.1f} s" if r["precompute_s"] else ""
        print(f"{r['configuration']:64s} {r['pairs_per_s']:8.2f} {rounds:>14s} "
              f"{100 * r['model_flops_fraction_of_matmul_rate']:10.1f}% "
              f"{100 * r['executed_fraction_of_matmul_rate']:8.1f}%  {pre}")
    print(f"fp32 matmul rate {peak / 1e9:.1f} GFLOP/s at {threads} threads")
    for reference in ("live", "precomputed"):
        c = compared[reference]
        if c["dpoc_over_trl"] is not None:
            print(f"{reference}: {c['dpoc_best']} / {c['trl_best']} = {c['dpoc_over_trl']:.2f}x "
                  f"(floor 1.5x: {'met' if c['met'] else 'NOT met'})")
    m = compared["matmul_rate"]
    print(f"dpoc's best at {100 * m['fraction']:.1f}% of the matmul rate in model FLOPs (floor 40%: "
          f"{'met' if m['met'] else 'NOT met'}); {100 * m['executed_fraction']:.1f}% in the FLOPs it executes")


if __name__ == "__main__":
    sys.exit(main())
