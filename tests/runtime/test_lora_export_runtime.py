"""The exported adapter against the dpoc runtime that trained it: a LoRA run's checkpoint after two steps,
converted to a PEFT adapter and loaded by PEFT on the base, gives the log-probs the runtime logged at step 3
(computed with those adapters); `--merge` gives the same, and with the base as reference the same loss."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from peft import PeftModel

from dpoc.contract import hf_config
from dpoc.runtime.weights import peft
from tests.runtime import hf_models
from tests.runtime.synthetic import write_args, write_pairs
from tests.runtime.test_runtime_convert import read_pairs, sequence_logp, transformers_first_step
from tests.runtime.test_runtime_train import metrics, train

KEYS = ("logps/chosen", "logps/rejected")


@pytest.mark.slow
def test_the_exported_adapter_gives_the_runtime_log_probs(dpoc_cli, tmp_path):
    base = hf_models.save_model("qwen3", tmp_path / "base")
    pairs = write_pairs(tmp_path / "pairs", pairs=8, seed=5)
    save = tmp_path / "runs" / "lora" / "checkpoints"
    args = write_args(tmp_path / "lora.args", pairs, tmp_path / "runs" / "lora", steps=3, global_batch=8,
                      micro_batch=2, lr=2e-2, model=hf_models.model_flags(base),
                      init=[("--dpoc-init", "hf"), ("--dpoc-hf-weights", str(base)), ("--ref-model", str(base))],
                      extra=[("--lora-r", 4), ("--lora-alpha", 8.0), ("--save", str(save)), ("--save-interval", 2),
                             ("--dpoc-keep-checkpoints", 5)])
    done = train(args, 1)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = metrics(tmp_path / "runs" / "lora")[2]  # step 3: the policy with the adapters after two updates
    assert logged["rewards/margins"] != 0
    config = hf_config.read_config(base, "(directory)", str(base))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"model": hf_config.architecture(config, str(base))}))
    folder = save / "iter_0000002"
    assert dpoc_cli("convert", "mcore-to-hf", folder, tmp_path / "adapter", "--plan", plan).code == 0
    assert dpoc_cli("convert", "mcore-to-hf", folder, tmp_path / "merged", "--plan", plan, "--merge").code == 0
    assert json.loads((tmp_path / "adapter" / peft.CONFIG).read_text())["base_model_name_or_path"] == str(base)

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    policy = PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    data = read_pairs(pairs)
    for key, side in zip(KEYS, ("chosen", "rejected"), strict=True):
        got = sum(sequence_logp(policy, p[f"{side}_input_ids"], p[f"{side}_labels"]) for p in data) / len(data)
        assert got == pytest.approx(logged[key], rel=1e-5, abs=1e-6), key
    merged = transformers_first_step(tmp_path / "merged", base, data)
    for key in (*KEYS, "loss", "rewards/margins"):
        assert merged[key] == pytest.approx(logged[key], rel=1e-5, abs=1e-6), key
