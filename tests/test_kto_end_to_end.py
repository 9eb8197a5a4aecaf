"""KTO end to end on CPU: a tiny kto recipe (policy and reference two different Hugging Face checkpoints, TRL's
unpaired rows) → `dpoc build` → its preprocess.sh → its launch.sh; the first step's metrics equal TRL's own
KTOTrainer run on the same weights and the same examples in the same batches (fp32); tp=2, pp=2 and a
precomputed reference equal 1 process with a live one."""

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
from tests.runtime.hf_models import make_model
from tests.runtime.synthetic import VOCAB

EOS = VOCAB - 1
BETA, DESIRABLE, UNDESIRABLE = 0.3, 1.2, 0.8
MICRO, GLOBAL, SEQ = 4, 8, 64
KEYS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def _checkpoint(directory: Path, seed: int) -> Path:
    """A seeded random Qwen3 with a word-level tokenizer (w0 .. w126, `</s>`) whose chat template joins the
    messages' texts, so dpoc's template and TRL's plain-text prompts give the same token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = make_model("qwen3", seed)
    model.config.eos_token_id = model.config.pad_token_id = EOS
    model.save_pretrained(directory)
    core = Tokenizer(models.WordLevel({f"w{i}": i for i in range(EOS)} | {"</s>": EOS}, unk_token="</s>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(directory)
    return directory


def _rows(count: int) -> list[dict]:
    rng = random.Random(3)

    def words(low: int, high: int) -> str:
        return " ".join(f"w{rng.randrange(EOS)}" for _ in range(rng.randint(low, high)))

    return [{"prompt": words(3, 8), "completion": f" {words(2, 9)} </s>", "label": rng.random() < 0.6}
            for _ in range(count)]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    work = tmp_path_factory.mktemp("kto")
    policy, reference = _checkpoint(work / "policy", 1), _checkpoint(work / "reference", 2)
    rows = _rows(24)
    (work / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return work, policy, reference, rows


def _dpoc(job, name: str, tp: int = 1, pp: int = 1, mode: str = "live") -> dict:
    work, policy, reference, _ = job
    recipe = work / "kto.yaml"
    recipe.write_text(json.dumps({
        "model": {"hf_weights": str(policy)}, "hardware": {"preset": "cpu", "devices_per_node": tp * pp},
        "dataset": {"path": str(work / "kto.jsonl"), "template": "tokenizer", "workers": 1,
                    "output_prefix": str(work / "data" / "kto")},
        "training": {"seq_length": SEQ, "global_batch_size": GLOBAL, "train_iters": 1, "lr": 1e-3,
                     "warmup_iters": 0, "lr_decay_style": "constant", "seed": 42},
        "dpo": {"loss": "kto", "beta": BETA, "kto_desirable_weight": DESIRABLE, "kto_undesirable_weight": UNDESIRABLE,
                "reference": mode},
        "parallelism": {"tp": tp, "pp": pp, "vpp": 1, "cp": 1, "micro_batch_size": MICRO, "recompute": "none"},
        "checkpoint": {"init": "hf", "ref_model": str(reference)}, "run_dir": str(work / name)}))
    out = work / f"build-{name}"
    build(recipe, out=out)
    # every build's dataset section is the same: the first run's preprocess.sh writes the data all of them read
    preprocessed = (work / "data").is_dir()
    for script in ("launch.sh",) if preprocessed else ("preprocess.sh", "launch.sh"):
        run = subprocess.run(["bash", str(out / script)], cwd=REPO, env=script_env(DPOC_MASTER_PORT=str(free_port())),
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    (first,) = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    return first


def _step_order(work: Path) -> list[int]:
    """The examples of dpoc's first step, in its micro-batches' order (`data.step_groups`)."""
    from dpoc.runtime.step.data import Batching, step_groups
    from dpoc.runtime.step.unpaired import UnpairedDataset

    dataset = UnpairedDataset(str(work / "data" / "kto"), SEQ, MICRO)
    return [int(i) for g in step_groups(dataset, 0, Batching(GLOBAL, MICRO, SEQ, 42, 1), 1) for i in g]


def _trl(job, order: list[int]) -> dict:
    """TRL 1.16's KTOTrainer on the same examples, batch by batch as dpoc's first step takes them."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    work, policy, reference, rows = job
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
def test_the_first_step_equals_trls_kto_trainer_and_tp2_pp2_and_precomputed_equal_it(job):
    ours = _dpoc(job, "one")
    theirs = _trl(job, _step_order(job[0]))
    assert set(KEYS) <= set(ours)
    for key in (*KEYS, "grad_norm"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    assert ours["kl"] > 0  # the two checkpoints differ: the reference point is not clamped away
    for other in (_dpoc(job, "tp2", tp=2), _dpoc(job, "pp2", pp=2), _dpoc(job, "precomputed", mode="precomputed")):
        for key in (*KEYS, "grad_norm"):
            assert other[key] == pytest.approx(ours[key], rel=1e-4, abs=1e-6), key
