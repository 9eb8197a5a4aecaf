"""KTO end to end on CPU: a tiny kto recipe (policy and reference two different Hugging Face checkpoints, TRL's
unpaired rows) → `dpoc build` → its preprocess.sh → its launch.sh; the first step's metrics equal TRL's own
KTOTrainer run on the same weights and the same examples in the same batches (fp32). Every layout the runtime
has trains kto: tp2, pp2, pp2 x vpp2, cp2, packing and a precomputed reference equal that one process; dp2
follows TRL's KTOTrainer over several processes (one KL point, the ranks' batch means averaged, then clamped; the
metrics over every completion of the ranks' batches), equal to one process where the two definitions agree and
to float64 where they do not; ep2 on a tiny MoE equals the same MoE at dp2 without expert parallelism. The
layouts' runs are the builds' megatron.args, one launch per process count (`tests/runtime/batched.Runs`)."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
import torch

from dpoc.common.ports import free_port
from dpoc.compiler.pipeline import build
from tests.conftest import REPO, script_env
from tests.runtime.batched import Runs
from tests.runtime.hf_models import make_model
from tests.runtime.synthetic import VOCAB

EOS = VOCAB - 1
BETA, DESIRABLE, UNDESIRABLE = 0.3, 1.2, 0.8
MICRO, GLOBAL, SEQ, LAYERS = 4, 8, 64, 4  # 4 layers: two virtual stages on each of two pipeline ranks
KEYS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
COMPARED = (*KEYS, "grad_norm")
# what data parallelism (TRL's processes: one KL point, means over the ranks' batches together) and one process
# (each batch its own KL point; the mean of the batches' means) agree on here: the rewards and log-probs, as every
# batch holds as many desirable completions (`_rows`), and with the dense checkpoints the KL point, as both
# batches' estimates are positive (the MoE's are not: nothing is clamped in one and not in the other)
FORWARD = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")  # no KL in them
AGREED = ("kl", *FORWARD)
LAYOUTS = {  # name: (processes, build settings); each equals the one-process run on every metric
    "tp2": (2, dict(tp=2)),
    "pp2": (2, dict(pp=2)),
    "pp2-vpp2": (2, dict(pp=2, vpp=2)),
    "cp2": (2, dict(cp=2)),
    "packing": (1, dict(packing=True)),
    "precomputed": (1, dict(reference="precomputed")),
}
MOE = {"moe": (1, dict(model="moe")), "moe-dp2": (2, dict(model="moe")), "ep2": (2, dict(model="moe", ep=2))}


def _checkpoint(directory: Path, seed: int, name: str = "qwen3", **config) -> Path:
    """A seeded random Qwen3 (`name`: a family of `hf_models.MODELS`; `config`: its config changes) with a
    word-level tokenizer (w0 .. w126, `</s>`) whose chat template joins the messages' texts, so dpoc's template
    and TRL's plain-text prompts give the same token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = make_model(name, seed, **config)
    model.config.eos_token_id = model.config.pad_token_id = EOS
    model.save_pretrained(directory)
    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(EOS)} | {"</s>": EOS}, unk_token="</s>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(directory)
    return directory


def _rows(count: int) -> list[dict]:
    """TRL's unpaired rows, seeded texts; the last of every MICRO rows (one micro-batch, its own KL batch) is
    undesirable, so every batch holds both labels, as many of each as every other batch."""
    rng = random.Random(3)

    def words(low: int, high: int) -> str:
        return " ".join(f"w{rng.randrange(EOS)}" for _ in range(rng.randint(low, high)))

    return [{"prompt": words(3, 8), "completion": f" {words(2, 9)} </s>", "label": i % MICRO != MICRO - 1}
            for i in range(count)]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    work = tmp_path_factory.mktemp("kto")
    for model, extra in (("dense", dict(name="qwen3", num_hidden_layers=LAYERS)), ("moe", dict(name="qwen3_moe"))):
        _checkpoint(work / model / "policy", 1, **extra)
        _checkpoint(work / model / "reference", 2, **extra)
    rows = _rows(24)
    (work / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return work, rows


def _build(work: Path, name: str, processes: int = 1, model: str = "dense", tp: int = 1, pp: int = 1, vpp: int = 1,
           cp: int = 1, ep: int = 1, packing: bool = False, reference: str = "live") -> Path:
    """The kto recipe at this layout, built into `work/build-name`; it trains into `work/runs/name` from the data
    every build shares (the same dataset section: the one-process run's preprocess.sh writes it)."""
    recipe = work / f"{name}.yaml"
    recipe.write_text(json.dumps({
        "model": {"hf_weights": str(work / model / "policy")},
        "hardware": {"preset": "cpu", "devices_per_node": processes},
        "dataset": {"path": str(work / "kto.jsonl"), "template": "tokenizer", "workers": 1,
                    "output_prefix": str(work / "data" / "kto")},
        "training": {"seq_length": SEQ, "global_batch_size": GLOBAL, "train_iters": 1, "lr": 1e-3,
                     "warmup_iters": 0, "lr_decay_style": "constant", "seed": 42, "packing": packing},
        "dpo": {"loss": "kto", "beta": BETA, "kto_desirable_weight": DESIRABLE, "kto_undesirable_weight": UNDESIRABLE,
                "reference": reference},
        "parallelism": {"tp": tp, "pp": pp, "vpp": vpp, "cp": cp, "ep": ep, "micro_batch_size": MICRO,
                        "recompute": "none"},
        "checkpoint": {"init": "hf", "ref_model": str(work / model / "reference")},
        "run_dir": str(work / "runs" / name)}))
    out = work / f"build-{name}"
    build(recipe, out=out)
    return out


def _first_step(work: Path, name: str) -> dict:
    (first,) = [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return first


@pytest.fixture(scope="module")
def one(job) -> dict:
    """The one-process run from its rendered files: preprocess.sh (the data every build reads), then launch.sh."""
    work, _ = job
    out = _build(work, "one")
    for script in ("preprocess.sh", "launch.sh"):
        run = subprocess.run(["bash", str(out / script)], cwd=REPO, env=script_env(DPOC_MASTER_PORT=str(free_port())),
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    return _first_step(work, "one")


@pytest.fixture(scope="module")
def runs(job, one) -> Runs:
    """Every other layout's run, on its build's megatron.args: one launch per process count. The precomputed
    build's reference pass (what its reference.sh runs) goes first in the one-process launch."""
    work, _ = job
    runs = Runs(work / "launches")
    for name, (processes, settings) in {**LAYOUTS, "dp2": (2, {}), **MOE}.items():
        args = _build(work, name, processes, **settings) / "megatron.args"
        if name == "precomputed":
            runs.add("precompute", ["-m", "dpoc.runtime.precompute", f"@{args}"])
        runs.add(name, ["-m", "dpoc.runtime.train", f"@{args}"], processes)
    return runs


def _finished(job, runs: Runs, name: str) -> dict:
    """A declared run's first step, once it (and the run before it, for the precomputed one) exited 0."""
    for run in ("precompute", name) if name == "precomputed" else (name,):
        done = runs.result(run)
        assert done.returncode == 0, done.stderr[-4000:]
    return _first_step(job[0], name)


def _close(got: dict, expected: dict, keys: tuple[str, ...], what: str) -> None:
    for key in keys:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (what, key)


def _step_order(work: Path) -> list[int]:
    """The examples of dpoc's first step, in its micro-batches' order (`data.step_groups`); at dp2 rank k runs
    micro-batch k."""
    from dpoc.runtime.step.data import Batching, step_groups
    from dpoc.runtime.step.unpaired import UnpairedDataset

    dataset = UnpairedDataset(str(work / "data" / "kto"), SEQ, MICRO)
    return [int(i) for g in step_groups(dataset, 0, Batching(GLOBAL, MICRO, SEQ, 42, 1), 1) for i in g]


def _trl(job, order: list[int]) -> dict:
    """TRL 1.16's KTOTrainer on the same examples, batch by batch as dpoc's first step takes them."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    work, rows = job
    policy, reference = work / "dense" / "policy", work / "dense" / "reference"
    args = KTOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=MICRO, gradient_accumulation_steps=GLOBAL // MICRO,
        max_steps=1, learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, beta=BETA, desirable_weight=DESIRABLE, undesirable_weight=UNDESIRABLE, max_length=SEQ,
        use_cpu=True, bf16=False, fp16=False, model_init_kwargs={"dtype": "float32"}, disable_dropout=True,
        train_sampling_strategy="sequential", dataloader_num_workers=0, logging_steps=1, report_to=[],
        save_strategy="no", seed=42)
    trainer = KTOTrainer(model=str(policy), args=args, processing_class=AutoTokenizer.from_pretrained(policy),
                         ref_model=AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32),
                         train_dataset=Dataset.from_list([rows[i] for i in order]))
    trainer.train()
    (logged,) = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return logged


@pytest.mark.slow
def test_the_first_step_equals_trls_kto_trainer(job, one):
    theirs = _trl(job, _step_order(job[0]))
    assert set(KEYS) <= set(one)
    for key in COMPARED:
        assert one[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    assert one["kl"] > 0  # the two checkpoints differ: the reference point is not clamped away


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_layout_equals_one_process(job, one, runs, layout):
    _close(_finished(job, runs, layout), one, COMPARED, layout)
    log = (job[0] / "runs" / layout / "train.log").read_text()
    if layout == "precomputed":
        assert f"(precomputed log-probs: {job[0] / 'data' / 'kto'}_reference-" in log  # its reference pass's file
    if layout == "packing":
        assert "--dpoc-packing\n" in (job[0] / "build-packing" / "megatron.args").read_text()


@pytest.fixture(scope="module")
def float64_dp2(job, one) -> dict:
    """dp2's first step in float64: TRL's KTOTrainer over 2 processes, each one of the step's two batches."""
    import transformers

    from tests.test_losses_float64 import _kto_step

    work, _ = job
    policy, reference = (transformers.AutoModelForCausalLM.from_pretrained(work / "dense" / side, dtype=torch.float64)
                         .eval() for side in ("policy", "reference"))
    step = _kto_step(str(work / "data" / "kto"), policy, reference, _step_order(work), MICRO, BETA, DESIRABLE,
                     UNDESIRABLE)
    return {key: float(value.detach()) for key, value in step.items()}


@pytest.mark.slow
def test_data_parallel_kto_is_trls_over_processes(job, one, runs, float64_dp2):
    """The two ranks share one KL point, the mean of their batches', so the loss and gradient differ from one
    process's (each batch its own point) by what TRL's definition says; the rest agrees with one process."""
    dp2 = _finished(job, runs, "dp2")
    _close(dp2, one, AGREED, "dp2 vs 1 process")
    _close(dp2, float64_dp2, COMPARED, "dp2 vs float64")
    assert abs(dp2["loss"] - one["loss"]) > 1e-4  # the batches' KL points differ: a rank's own would show


@pytest.mark.slow
def test_expert_parallel_kto_equals_the_same_moe_without_it(job, runs):
    """The MoE's two batches' KL estimates are not both positive, so one process (each clamped on its own) and
    two (their mean clamped) differ in the KL point; the forward's rewards and log-probs agree."""
    moe, dp2, ep2 = (_finished(job, runs, name) for name in MOE)
    _close(ep2, dp2, COMPARED, "ep2 vs dp2")
    _close(ep2, moe, FORWARD, "ep2 vs 1 process")
