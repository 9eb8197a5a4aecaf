"""KTO against TRL 1.16's own KTOTrainer._compute_loss in float64, on the same per-token log-probs: the loss,
its gradient with respect to the policy's token log-probs, and the metrics TRL logs (kl, rewards, logps).

TRL's method runs the model itself; a stand-in "model" returns fixed per-token log-probs, one set for the
batch's completions and one for its KL batch (told apart by their input ids), so the formulas run are TRL's.
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch
import trl.trainer.kto_trainer as trl_kto  # the test extra has trl: a missing one fails, never skips

from dpoc.runtime.losses import Params
from dpoc.runtime.losses.kto import Completions, kl_estimate, kl_partners, kto, kto_metrics, kto_record, kto_sums
from tests.conftest import RECIPES, run_subprocess

N, LENGTH = 6, 9
TOL = dict(rel=1e-6, abs=1e-9)
MAIN, KL = 1, 2  # the input id of every token of a completion / of a KL sequence
TINY = RECIPES / "tiny_cpu.yaml"


def _data(seed: int, kl_shift: float = 0.0):
    """Per-token log-probs [n, L] of policy and reference on the completions and on the KL batch, and a
    response mask for each (a prompt, a completion of varying length, padding). `kl_shift` moves the
    reference's KL log-probs, to make the KL estimate negative."""
    g = torch.Generator().manual_seed(seed)

    def logps():
        return -torch.rand(N, LENGTH, generator=g, dtype=torch.float64) * 2

    def mask():
        out = torch.zeros(N, LENGTH, dtype=torch.float64)
        for row in range(N):
            start = int(torch.randint(0, 3, (1,), generator=g))
            out[row, start:int(torch.randint(start + 1, LENGTH + 1, (1,), generator=g))] = 1
        return out

    policy, kl_policy = logps(), logps()
    reference = policy - 0.3 * torch.randn(N, LENGTH, generator=g, dtype=torch.float64)
    kl_reference = kl_policy - 0.3 * torch.randn(N, LENGTH, generator=g, dtype=torch.float64) + kl_shift
    return policy, reference, mask(), kl_policy, kl_reference, mask()


class _TokenModel(torch.nn.Module):
    """Stands in for a causal LM under TRL's fused LM head: per-token log-probs of the labelled positions,
    the completions' or the KL batch's by the input ids."""

    is_gradient_checkpointing = False

    def __init__(self, token_logps: torch.Tensor, kl_token_logps: torch.Tensor, trainable: bool):
        super().__init__()
        self.logps = torch.nn.Parameter(token_logps.clone(), requires_grad=trainable)
        self.kl_logps = kl_token_logps

    def forward(self, input_ids=None, labels=None, **_):
        source = self.logps if int(input_ids[0, 0]) == MAIN else self.kl_logps
        shifted = (labels[:, 1:] != -100).to(source.dtype)
        zeros = torch.zeros_like(shifted)
        return types.SimpleNamespace(log_probs=source * shifted, entropy=zeros, mean_logits=zeros)


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x


def _inputs(mask: torch.Tensor, token: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input ids, attention mask and completion mask one token longer than `mask` (TRL shifts the labels)."""
    completion = torch.cat([torch.zeros(mask.shape[0], 1, dtype=torch.long), mask.long()], dim=1)
    return torch.full_like(completion, token), torch.ones_like(completion), completion


def _trl(data, labels, beta, desirable, undesirable):
    policy, reference, mask, kl_policy, kl_reference, kl_mask = data
    model, ref_model = _TokenModel(policy, kl_policy, True), _TokenModel(reference, kl_reference, False)
    inputs = dict(zip(("input_ids", "attention_mask", "completion_mask"), _inputs(mask, MAIN), strict=True))
    inputs.update(zip(("KL_input_ids", "KL_attention_mask", "KL_completion_mask"), _inputs(kl_mask, KL),
                      strict=True))
    inputs["label"] = labels
    trainer = types.SimpleNamespace(
        model=model, ref_model=ref_model, accelerator=_Accelerator(), aux_loss_enabled=False,
        precompute_ref_logps=False, calculate_KL=True, loss_type="kto", beta=beta, desirable_weight=desirable,
        undesirable_weight=undesirable, args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    trainer._compute_kl_logps = types.MethodType(trl_kto.KTOTrainer._compute_kl_logps, trainer)
    loss = trl_kto.KTOTrainer._compute_loss(trainer, model, inputs, False)
    loss.backward()
    return float(loss.detach()), {k: v[0] for k, v in trainer._metrics["train"].items()}, model.logps.grad


def _dpoc(data, labels, beta, desirable, undesirable):
    policy, reference, mask, kl_policy, kl_reference, kl_mask = data
    token_logps = policy.clone().requires_grad_(True)
    x = Completions((token_logps * mask).sum(-1), (reference * mask).sum(-1), labels,
                    (kl_policy * kl_mask).sum(-1), (kl_reference * kl_mask).sum(-1))
    p = Params(beta=beta, kto_desirable_weight=desirable, kto_undesirable_weight=undesirable)
    kl = kl_estimate(x)
    loss = kto(x, p, kl).mean()
    loss.backward()
    return float(loss.detach()), kto_metrics(x, p, kl), token_logps.grad


LABELS = {"mixed": [True, False, True, True, False, False], "mostly desirable": [True, True, False, True, True, True],
          "all desirable": [True] * N, "all undesirable": [False] * N}


@pytest.mark.parametrize("labels", list(LABELS))
@pytest.mark.parametrize("seed,kl_shift", [(0, 0.0), (1, 0.0), (2, 0.5), (3, -0.5)])
@pytest.mark.parametrize("desirable,undesirable", [(1.0, 1.0), (1.33, 0.6)])
def test_kto_equals_trl(labels, seed, kl_shift, desirable, undesirable):
    data = _data(seed, kl_shift)
    label = torch.tensor(LABELS[labels])
    loss, metrics, grad = _dpoc(data, label, 0.3, desirable, undesirable)
    trl_loss, trl_metrics, trl_grad = _trl(data, label, 0.3, desirable, undesirable)
    assert loss == pytest.approx(trl_loss, **TOL)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-6, atol=1e-10)
    trl_metrics = {k: v for k, v in trl_metrics.items() if k.split("/")[0] in ("kl", "rewards", "logps")}
    assert set(metrics) == set(trl_metrics)
    for key, value in trl_metrics.items():
        assert metrics[key] == pytest.approx(value, **TOL), key


def test_a_negative_kl_estimate_is_clamped_to_zero():
    """The data's KL log-ratio is negative on average here: the reference point is 0, as in TRL."""
    data = _data(2, kl_shift=0.5)
    assert float((data[3] * data[5]).sum(-1).mean() - (data[4] * data[5]).sum(-1).mean()) < 0
    _, metrics, _ = _dpoc(data, torch.tensor(LABELS["mixed"]), 0.3, 1.0, 1.0)
    assert metrics["kl"] == 0.0


def test_the_kl_is_clamped_after_the_ranks_average_it():
    """Rank means -1 and 3: the reference point is their mean 1, not the mean of the clamped values 1.5."""
    def ranks(mean: float) -> Completions:
        zeros = torch.zeros(2, dtype=torch.float64)
        return Completions(zeros, zeros, torch.tensor([True, False]), torch.tensor([mean - 1, mean + 1]), zeros)

    def average(t: torch.Tensor) -> torch.Tensor:  # a two-rank all-reduce mean, the other rank's mean being 3
        return (t + 3.0) / 2

    assert float(kl_estimate(ranks(-1.0), average)) == 1.0
    assert float(kl_estimate(ranks(-1.0))) == 0.0


def test_the_kl_estimate_carries_no_gradient():
    x = Completions(torch.zeros(2), torch.zeros(2), torch.tensor([True, False]),
                    torch.tensor([1.0, 2.0], requires_grad=True), torch.zeros(2))
    assert not kl_estimate(x).requires_grad


def test_the_compiler_builds_kto_alone_on_the_unpaired_dataset(tmp_path):
    """kto's build preprocesses into the unpaired dataset and passes its weights; kto with another loss, with a
    pair-only option, or unpaired data with a paired loss is an error (one line, exit 2, nothing written)."""
    out = tmp_path / "b"
    result = run_subprocess("build", TINY, "dpo.loss=kto", "dpo.kto_desirable_weight=1.5", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "unpaired: true\n" in (out / "preprocess.yaml").read_text()
    args = (out / "megatron.args").read_text()
    assert "--dpo-loss-type kto\n" in args and "--dpoc-kto-desirable-weight 1.5\n" in args
    refusals = {("dpo.loss=[kto,sigmoid]",): "dpo.loss: ('kto', 'sigmoid'): kto trains on unpaired completions and "
                "cannot be added to other losses (valid: kto alone, or a list of paired losses)",
                ("dpo.loss=kto", "dpo.ld_alpha=0.5"): "dpo.ld_alpha: kto trains on unpaired completions, and this "
                "weights pairs (valid: leave it out)",
                ("dataset.layout=unpaired",): "dataset.layout: unpaired: unpaired completions train only with kto, "
                "not sigmoid (valid: dpo.loss: kto, or paired data)",
                ("dpo.kto_undesirable_weight=0.5",): "dpo.kto_undesirable_weight: no chosen loss reads it (loss: "
                "sigmoid); valid: leave it out, or a loss in ['kto']"}
    for overrides, message in refusals.items():
        result = run_subprocess("build", TINY, *overrides, "-o", tmp_path / "refused")
        assert (result.returncode, result.stderr) == (2, f"{TINY}: {message}\n")
        assert not (tmp_path / "refused").exists()


# --- the KL batch: TRL's KTOTrainer._prepare_dataset on a character-level stand-in tokenizer ----------------


class _CharTokenizer:
    """One token per character, so every completion's token ids spell its text."""

    eos_token = "#"

    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}


def _trl_kl_completions(completions: list[str], batch_size: int) -> list[str]:
    import datasets

    dataset = datasets.Dataset.from_dict({"prompt": [f"p{i}:" for i in range(len(completions))],
                                          "completion": completions, "label": [True] * len(completions)})
    trainer = types.SimpleNamespace(_tokenizer=_CharTokenizer(), calculate_KL=True, desirable_weight=1.0,
                                    undesirable_weight=1.0)
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, per_device_train_batch_size=batch_size)
    out = trl_kto.KTOTrainer._prepare_dataset(trainer, dataset, _CharTokenizer(), args, "train")
    return ["".join(map(chr, ids)) for ids in out["KL_completion_ids"]]


@pytest.mark.parametrize("n,batch_size", [(6, 3), (7, 3), (5, 2), (4, 4), (3, 1), (2, 8)])
def test_the_kl_batch_is_built_as_trl_builds_it(n, batch_size):
    """Completions rotated by one within each run of batch_size examples, the last run possibly shorter."""
    completions = [f"c{i}#" for i in range(n)]
    assert [completions[j] for j in kl_partners(n, batch_size)] == _trl_kl_completions(completions, batch_size)


def test_every_prompt_but_a_lone_one_gets_another_completion_of_its_batch():
    partners = kl_partners(7, 3)
    assert partners == [2, 0, 1, 5, 3, 4, 6]
    assert all(j // 3 == i // 3 for i, j in enumerate(partners))


def test_a_step_reduces_its_batches_as_trl_logs_them():
    """Two data-parallel ranks run their j-th micro-batches together, as TRL's processes run one batch: the row
    added over both gives the means over the union of their completions (TRL gathers the sums and counts) with
    the KL both ranks used; the step's value is the mean over its batches; loss is the mean over completions."""
    g = torch.Generator().manual_seed(5)

    def batch(labels: list[bool]) -> Completions:
        n = len(labels)
        return Completions(-torch.rand(n, generator=g, dtype=torch.float64) * 9,
                           -torch.rand(n, generator=g, dtype=torch.float64) * 9, torch.tensor(labels),
                           -torch.rand(n, generator=g, dtype=torch.float64), -torch.rand(n, generator=g,
                                                                                        dtype=torch.float64))

    p = Params(beta=0.3, kto_desirable_weight=1.2, kto_undesirable_weight=0.8)
    steps = [(batch([True, False, True]), batch([True, True, True])),  # batch 1: ranks 0 and 1
             (batch([False, False, False]), batch([False, True, False]))]  # batch 2
    rows, expected = [], []
    for rank0, rank1 in steps:
        both = Completions(*(torch.cat([a, b]) for a, b in zip(vars(rank0).values(), vars(rank1).values(),
                                                                    strict=True)))
        kl = kl_estimate(both)  # equal row counts: the mean of the two ranks' means
        rows.append(kto_sums(rank0, p, kl, kto(rank0, p, kl)) + kto_sums(rank1, p, kl, kto(rank1, p, kl)))
        expected.append(kto_metrics(both, p, kl) | {"loss": float(kto(both, p, kl).mean())})
    record = kto_record(torch.stack(rows), replicas=2)
    assert set(record) == set(expected[0]) == set(expected[1])
    for key in record:
        assert record[key] == pytest.approx((expected[0][key] + expected[1][key]) / 2, **TOL), key
