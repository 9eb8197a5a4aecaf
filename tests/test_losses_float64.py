"""sigmoid (with cDPO's label smoothing), ipo, simpo and orpo against float64: `dpoc build` of a tiny recipe per
loss, policy and reference two different Hugging Face checkpoints (`checkpoint.ref_model`; simpo and orpo have
none), the runtime's first step on each rendered megatron.args (all four in one process), and its metrics and
gradient norm equal a float64 computation written here: transformers' forward of the same checkpoints in
float64, and each loss's formula from its paper / TRL's documentation, not from dpoc's or TRL's code.

One micro-batch holds the step's 8 pairs, so the NLL terms (the mean over the micro-batch's chosen tokens) are
the mean over the step's chosen tokens, whatever order the sampler draws the pairs in.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from dpoc.compiler.pipeline import build
from tests.conftest import RECIPES, REPO, script_env
from tests.runtime.hf_models import save_model
from tests.runtime.synthetic import write_pairs
from tests.runtime.test_runtime_convert import read_pairs

PAIRS, BETA, SMOOTHING, GAMMA, ALPHA = 8, 0.5, 0.1, 0.3, 0.2
LOSSES = {  # loss: its recipe settings besides dpo.loss and dpo.beta
    "sigmoid": [f"dpo.label_smoothing={SMOOTHING}"],
    "ipo": [],
    "simpo": [f"dpo.simpo_gamma={GAMMA}", f"dpo.cpo_alpha={ALPHA}"],
    "orpo": [],
}
REFERENCE_FREE = ("simpo", "orpo")
KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected")
EXTRA = {"simpo": ("nll_loss",), "orpo": ("nll_loss", "log_odds_ratio", "log_odds_chosen")}


@pytest.fixture(scope="module")
def first_steps(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """Each loss's first-step metrics: one build per loss, the four runs in one process."""
    work = tmp_path_factory.mktemp("float64")
    save_model("qwen3", work / "policy", seed=0)
    save_model("qwen3", work / "reference", seed=1)
    pairs = write_pairs(work / "pairs", pairs=PAIRS, seed=5)
    common = ["~model.preset", f"model.hf_weights={work / 'policy'}", "model.tokenizer=./assets/tiny/tokenizer",
              "checkpoint.init=hf", f"dataset.output_prefix={pairs}", "hardware.devices_per_node=1",
              "training.train_iters=1", "training.warmup_iters=0", f"training.global_batch_size={PAIRS}",
              f"parallelism.micro_batch_size={PAIRS}", f"dpo.beta={BETA}"]
    args_files = []
    for loss, settings in LOSSES.items():
        reference = [] if loss in REFERENCE_FREE else [f"checkpoint.ref_model={work / 'reference'}"]
        build(RECIPES / "tiny_cpu.yaml", [*common, f"dpo.loss={loss}", *settings, *reference,
                                          f"run_dir={work / 'runs' / loss}"], out=work / loss)
        args_files.append(str(work / loss / "megatron.args"))
    done = subprocess.run([sys.executable, "-m", "tests.runtime.train_runs", *args_files], cwd=REPO,
                          env=script_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    steps = {}
    for loss in LOSSES:
        (steps[loss],) = [json.loads(line) for line in (work / "runs" / loss / "metrics.jsonl").read_text()
                          .splitlines()]
        log = (work / "runs" / loss / "train.log").read_text()
        want = "none (a reference-free loss)" if loss in REFERENCE_FREE else f"hf {work / 'reference'}"
        assert f"weights: policy from hf {work / 'policy'}, reference from {want}" in log, loss
    return work, steps


def _response_logps(model, pairs: list[dict], side: str) -> list[torch.Tensor]:
    """Per pair, the log-probs of the `side` response's tokens under `model` (float64): position i predicts
    token i + 1 where that label is not -100."""
    out = []
    for pair in pairs:
        ids, labels = torch.tensor([pair[f"{side}_input_ids"]]), torch.tensor(pair[f"{side}_labels"])
        logp = F.log_softmax(model(ids).logits[0, :-1], -1)
        targets = labels[1:]
        keep = targets != -100
        out.append(logp[keep].gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1))
    return out


def _float64_step(loss: str, policy, tokens: dict, ref: dict | None) -> dict[str, float]:
    """The first step's metrics and gradient norm, from each pair's response token log-probs (`tokens`:
    side -> one tensor per pair, the policy's, with gradients; `ref`: the reference's summed log-probs)."""
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
    grads = torch.autograd.grad(total, [p for p in policy.parameters()], retain_graph=True, allow_unused=True)
    out.update({
        "loss": total, "rewards/chosen": reward_chosen.mean(), "rewards/rejected": reward_rejected.mean(),
        "rewards/accuracies": (reward_chosen > reward_rejected).double().mean(),
        "rewards/margins": (reward_chosen - reward_rejected).mean(), "logps/chosen": chosen.mean(),
        "logps/rejected": rejected.mean(),
        "grad_norm": torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None))})
    return {key: float(value.detach()) for key, value in out.items()}


@pytest.fixture(scope="module")
def float64_steps(first_steps) -> dict[str, dict]:
    work, _ = first_steps
    pairs = read_pairs(str(work / "pairs"))
    policy = transformers.AutoModelForCausalLM.from_pretrained(work / "policy", dtype=torch.float64).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(work / "reference", dtype=torch.float64).eval()
    tokens = {side: _response_logps(policy, pairs, side) for side in ("chosen", "rejected")}
    with torch.no_grad():
        ref = {side: torch.stack([t.sum() for t in _response_logps(reference, pairs, side)])
               for side in ("chosen", "rejected")}
    return {loss: _float64_step(loss, policy, tokens, None if loss in REFERENCE_FREE else ref) for loss in LOSSES}


@pytest.mark.slow
@pytest.mark.parametrize("loss", list(LOSSES))
def test_the_first_step_equals_float64(loss, first_steps, float64_steps):
    got, expected = first_steps[1][loss], float64_steps[loss]
    for key in (*KEYS, *EXTRA.get(loss, ())):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    assert got["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5), "grad_norm"
    assert set(got) - {"step", "fill", "grad_norm", "lr", "samples_per_s", "tokens_per_s"} \
        == {*KEYS, *EXTRA.get(loss, ())}  # every metric the loss logs is compared
    if loss not in REFERENCE_FREE:  # the reference really is other weights: the log-ratios are not the log-probs
        assert abs(got["rewards/chosen"] - BETA * got["logps/chosen"]) > 0.1
