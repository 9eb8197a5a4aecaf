"""sigmoid (with cDPO's label smoothing), ipo, simpo, orpo and kto against float64: `dpoc build` of a tiny recipe
per loss, policy and reference two different Hugging Face checkpoints (`checkpoint.ref_model`; simpo and orpo
have none), the runtime's first step on each rendered megatron.args (all five in one process), and its metrics
and gradient norm equal a float64 computation written here: transformers' forward of the same checkpoints in
float64, and each loss's formula from its paper / TRL's documentation, not from dpoc's or TRL's code.

One micro-batch holds the step's 8 pairs (kto: 8 completions), so the NLL terms (the mean over the micro-batch's
chosen tokens) are the mean over the step's chosen tokens, and kto's KL batch is the step's own completions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from megatron.core.datasets.indexed_dataset import IndexedDataset

from dpoc.cli import main as dpoc_main
from dpoc.compiler.pipeline import build
from dpoc.data.pairwise import dataset_prefix
from tests.conftest import RECIPES
from tests.runtime.batched import Runs
from tests.runtime.synthetic import write_pairs
from tests.runtime.test_runtime_convert import read_pairs
from tests.test_kto_end_to_end import _checkpoint, _rows

BATCH, BETA, SMOOTHING, GAMMA, ALPHA, DESIRABLE, UNDESIRABLE = 8, 0.5, 0.1, 0.3, 0.2, 1.2, 0.8
LOSSES = {  # loss: its recipe settings besides dpo.loss and dpo.beta
    "sigmoid": [f"dpo.label_smoothing={SMOOTHING}"],
    "ipo": [],
    "simpo": [f"dpo.simpo_gamma={GAMMA}", f"dpo.cpo_alpha={ALPHA}"],
    "orpo": [],
    "kto": [f"dpo.kto_desirable_weight={DESIRABLE}", f"dpo.kto_undesirable_weight={UNDESIRABLE}"],
}
REFERENCE_FREE = ("simpo", "orpo")
PAIR_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected")
KEYS = {"simpo": (*PAIR_KEYS, "nll_loss"), "orpo": (*PAIR_KEYS, "nll_loss", "log_odds_ratio", "log_odds_chosen"),
        "kto": ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                "logps/rejected")}
RUN_KEYS = {"step", "fill", "grad_norm", "lr", "samples_per_s", "tokens_per_s"}


@pytest.fixture(scope="module")
def first_steps(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """Each loss's first-step metrics: one build per loss, the five runs in one process."""
    work = tmp_path_factory.mktemp("float64")
    # seeds whose KL estimate on these completions is 1.2, well above the clamp at 0
    policy, reference = _checkpoint(work / "policy", 2), _checkpoint(work / "reference", 1)
    pairs = write_pairs(work / "pairs", pairs=BATCH, seed=5)
    (work / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(BATCH)))
    common = ["~model.preset", f"model.hf_weights={policy}", f"model.tokenizer={policy}", "checkpoint.init=hf",
              "hardware.devices_per_node=1", "training.train_iters=1", "training.warmup_iters=0",
              f"training.global_batch_size={BATCH}", f"parallelism.micro_batch_size={BATCH}", f"dpo.beta={BETA}"]
    data = {"paired": [f"dataset.output_prefix={pairs}"],
            "kto": [f"dataset.path={work / 'kto.jsonl'}", "~dataset.map_keys", "training.seq_length=64",
                    f"dataset.output_prefix={work / 'data' / 'kto'}"]}
    args_files = []
    for loss, settings in LOSSES.items():
        ref = [] if loss in REFERENCE_FREE else [f"checkpoint.ref_model={reference}"]
        build(RECIPES / "tiny_cpu.yaml", [*common, *data["kto" if loss == "kto" else "paired"], f"dpo.loss={loss}",
                                          *settings, *ref, f"run_dir={work / 'runs' / loss}"], out=work / loss)
        args_files.append(str(work / loss / "megatron.args"))
    (work / "data").mkdir()
    assert dpoc_main(["preprocess", str(work / "kto" / "preprocess.yaml")]) == 0  # what kto's preprocess.sh runs
    runs = Runs(work / "launches")  # the five runs in one process
    for loss, args_file in zip(LOSSES, args_files, strict=True):
        runs.add(loss, ["-m", "dpoc.runtime.train", f"@{args_file}"])
    for loss in LOSSES:
        done = runs.result(loss)
        assert done.returncode == 0, done.stderr[-4000:]
    steps = {}
    for loss in LOSSES:
        (steps[loss],) = [json.loads(line) for line in (work / "runs" / loss / "metrics.jsonl").read_text()
                          .splitlines()]
        log = (work / "runs" / loss / "train.log").read_text()
        want = "none (a reference-free loss)" if loss in REFERENCE_FREE else f"hf {reference}"
        assert f"weights: policy from hf {policy}, reference from {want}" in log, loss
    return work, steps


def _token_logps(model, ids: list[int], labels: list[int]) -> torch.Tensor:
    """The log-probs of a sequence's labelled tokens under `model` (float64): position i predicts token i + 1
    where that label is not -100."""
    logp = F.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
    targets = torch.tensor(labels[1:])
    keep = targets != -100
    return logp[keep].gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)


def _grad_norm(total: torch.Tensor, policy) -> torch.Tensor:
    grads = torch.autograd.grad(total, list(policy.parameters()), retain_graph=True, allow_unused=True)
    return torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None))


def _paired_step(loss: str, policy, tokens: dict, ref: dict | None) -> dict[str, torch.Tensor]:
    """A paired loss's first step, from each pair's response token log-probs (`tokens`: side -> one tensor per
    pair, the policy's, with gradients; `ref`: the reference's summed log-probs per side)."""
    sums = {side: torch.stack([t.sum() for t in tokens[side]]) for side in tokens}
    lengths = {side: torch.tensor([float(len(t)) for t in tokens[side]], dtype=torch.float64) for side in tokens}
    nll = -torch.cat(tokens["chosen"]).mean()  # the mean over all chosen tokens (one micro-batch)
    out = {}
    if loss in REFERENCE_FREE:  # SimPO and ORPO read length-averaged log-probs, and reward beta x them
        chosen, rejected = sums["chosen"] / lengths["chosen"], sums["rejected"] / lengths["rejected"]
        reward_chosen, reward_rejected = BETA * chosen, BETA * rejected
    else:
        chosen, rejected = sums["chosen"], sums["rejected"]
        reward_chosen, reward_rejected = BETA * (chosen - ref["chosen"]), BETA * (rejected - ref["rejected"])
    if loss == "sigmoid":  # cDPO: the preference flipped with probability SMOOTHING
        z = reward_chosen - reward_rejected
        per_pair = -(1 - SMOOTHING) * F.logsigmoid(z) - SMOOTHING * F.logsigmoid(-z)
    elif loss == "ipo":  # TRL's IPO: the log-ratios averaged over each response's tokens
        h = (chosen - ref["chosen"]) / lengths["chosen"] - (rejected - ref["rejected"]) / lengths["rejected"]
        per_pair = (h - 1 / (2 * BETA)) ** 2
    elif loss == "simpo":  # SimPO's margin gamma, plus CPO's NLL term
        per_pair = -F.logsigmoid(BETA * (chosen - rejected) - GAMMA) + ALPHA * nll
        out["nll_loss"] = nll
    else:  # ORPO: odds(y) = P / (1 - P) of the averaged probability P = exp(averaged log-prob)
        odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
        per_pair = nll - BETA * F.logsigmoid(odds)
        out.update(nll_loss=nll, log_odds_ratio=F.logsigmoid(odds).mean(), log_odds_chosen=odds.mean())
    total = per_pair.mean()
    return {**out, "loss": total, "rewards/chosen": reward_chosen.mean(), "rewards/rejected": reward_rejected.mean(),
            "rewards/accuracies": (reward_chosen > reward_rejected).double().mean(),
            "rewards/margins": (reward_chosen - reward_rejected).mean(), "logps/chosen": chosen.mean(),
            "logps/rejected": rejected.mean(), "grad_norm": _grad_norm(total, policy)}


def _kto_step(prefix: str, policy, reference, order: list[int] | None = None, block: int | None = None,
              beta: float = BETA, desirable: float = DESIRABLE, undesirable: float = UNDESIRABLE
              ) -> dict[str, torch.Tensor]:
    """KTO's first step on the preprocessed completions `order` (default: all, in order), in batches of `block`
    (default: one batch), each batch one process of TRL's KTOTrainer: each prompt's KL sequence takes the
    previous example's completion of its batch (the first the last's), as TRL pairs them; the KL point is the
    mean over the batches of each one's mean policy-reference log-ratio on those (TRL's gathered mean over its
    processes), clamped at 0 and not differentiated; the metrics are means over all the step's completions,
    the loss too (data parallelism averages the processes' equal-sized means)."""
    ids, labels, flags = (IndexedDataset(dataset_prefix(prefix, f)) for f in
                          ("completion_input_ids", "completion_labels", "desirable"))
    order = list(range(len(ids))) if order is None else order
    block = block or len(order)
    examples = [(ids[i].tolist(), labels[i].tolist()) for i in order]
    good = torch.tensor([bool(flags[i][0]) for i in order])
    prompt = [sum(1 for t in lab if t == -100) for _, lab in examples]
    previous = [i - 1 if i % block else i + block - 1 for i in range(len(order))]
    mismatched = [(examples[i][0][:prompt[i]] + examples[j][0][prompt[j]:],
                   examples[i][1][:prompt[i]] + examples[j][1][prompt[j]:]) for i, j in enumerate(previous)]
    logps = torch.stack([_token_logps(policy, *e).sum() for e in examples])
    with torch.no_grad():
        ref = torch.stack([_token_logps(reference, *e).sum() for e in examples])
        kl_ratios = (torch.stack([_token_logps(policy, *e).sum() for e in mismatched])
                     - torch.stack([_token_logps(reference, *e).sum() for e in mismatched]))
        kl = kl_ratios.reshape(-1, block).mean(-1).mean().clamp(min=0)
    ratio = logps - ref
    per = torch.where(good, desirable * (1 - torch.sigmoid(beta * (ratio - kl))),
                      undesirable * (1 - torch.sigmoid(beta * (kl - ratio))))
    total = per.mean()
    rewards = beta * ratio
    return {"loss": total, "kl": kl, "rewards/chosen": rewards[good].mean(), "rewards/rejected": rewards[~good].mean(),
            "rewards/margins": rewards[good].mean() - rewards[~good].mean(), "logps/chosen": logps[good].mean(),
            "logps/rejected": logps[~good].mean(), "grad_norm": _grad_norm(total, policy)}


@pytest.fixture(scope="module")
def float64_steps(first_steps) -> dict[str, dict]:
    work, _ = first_steps
    policy = transformers.AutoModelForCausalLM.from_pretrained(work / "policy", dtype=torch.float64).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(work / "reference", dtype=torch.float64).eval()
    pairs = read_pairs(str(work / "pairs"))

    def sequences(side: str) -> list[tuple[list[int], list[int]]]:
        return [(p[f"{side}_input_ids"], p[f"{side}_labels"]) for p in pairs]

    tokens = {side: [_token_logps(policy, *s) for s in sequences(side)] for side in ("chosen", "rejected")}
    with torch.no_grad():
        ref = {side: torch.stack([_token_logps(reference, *s).sum() for s in sequences(side)])
               for side in ("chosen", "rejected")}
    steps = {loss: _paired_step(loss, policy, tokens, None if loss in REFERENCE_FREE else ref)
             for loss in LOSSES if loss != "kto"}
    steps["kto"] = _kto_step(str(work / "data" / "kto"), policy, reference)
    return {loss: {key: float(value.detach()) for key, value in step.items()} for loss, step in steps.items()}


@pytest.mark.slow
@pytest.mark.parametrize("loss", list(LOSSES))
def test_the_first_step_equals_float64(loss, first_steps, float64_steps):
    got, expected = first_steps[1][loss], float64_steps[loss]
    keys = KEYS.get(loss, PAIR_KEYS)
    assert set(got) - RUN_KEYS == set(keys)  # every metric the loss logs is compared
    for key in keys:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5), "grad_norm"
    if loss == "kto":  # the two checkpoints differ: the KL point is not clamped away, and both labels occur
        assert got["kl"] > 0.01 and "rewards/margins" in got
    elif loss not in REFERENCE_FREE:  # the reference is other weights: the log-ratios are not the log-probs
        assert abs(got["rewards/chosen"] - BETA * got["logps/chosen"]) > 0.1
