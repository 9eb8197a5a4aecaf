"""`dpoc convert mcore-to-hf` on a LoRA checkpoint: a PEFT adapter directory that PEFT loads on the base, or
(`--merge`) the base with the adapters merged in, equal to PEFT's merge_and_unload.

The checkpoint is written as the runtime writes one (`dpoc/runtime/model/lora.py`, `checkpoint/save_load.py`): a
torch_dist checkpoint of the adapters alone, `<linear>.lora_A` / `.lora_B` in global shapes with the layer as
index axis, and `dpoc_checkpoint.json`'s `lora` record naming the base and its hash. Its adapters come from an
adapter PEFT made, so every number is checked against PEFT itself.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict

from dpoc.contract import hf_config
from dpoc.contract.lora import HF_TARGETS, Lora, mcore_targets
from dpoc.runtime.weights import peft
from dpoc.runtime.weights.weight_identity import describe_weights
from tests.runtime.hf_models import logits, make_model
from tests.runtime.test_peft_format import _arch, _peft_model

LORA = Lora(rank=4, alpha=8.0, dropout=0.0, targets=mcore_targets(list(HF_TARGETS)), experts=False, init_from=None)


def _save_lora_checkpoint(folder, adapters, base, kind: str = "hf") -> None:
    """The adapters as a torch_dist checkpoint under their runtime keys, and the record the runtime writes."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from dpoc.runtime.model import device as devices
    from dpoc.runtime.weights.converter import _single_process

    layers = 1 + max(site.layer for site in adapters)
    state = {}
    for site, pair in adapters.items():
        key, index = site.weight()
        for part, tensor in zip(("lora_A", "lora_B"), pair, strict=True):
            name = key.removesuffix("weight") + part
            state[f"{name}/{index}"] = ShardedTensor.from_rank_offsets(
                name, tensor.unsqueeze(0).clone(), (0, index[0], layers), replica_id=0)
    with _single_process(), devices.running_on(devices.select("cpu", "gloo")):
        dist_checkpointing.save(state, str(folder))
    identity = describe_weights(str(base))
    record = {"lora": {"rank": LORA.rank, "alpha": LORA.alpha, "dropout": 0.0, "targets": list(LORA.targets),
                       "experts": False, "base": {"source": f"{kind} {base}", "sha256": identity["sha256"]}}}
    (folder / "dpoc_checkpoint.json").write_text(json.dumps(record))


@pytest.fixture
def trained(tmp_path):
    """(the PEFT model the adapters came from, base dir, checkpoint dir, plan.json)."""
    model = _peft_model("qwen3")
    arch = _arch(model)
    base = tmp_path / "base"
    make_model("qwen3").save_pretrained(base)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _save_lora_checkpoint(ckpt, peft.from_peft(get_peft_model_state_dict(model), arch, LORA, "peft"), base)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"model": hf_config.architecture(model.config.to_dict(), "config.json")}))
    return model, base, ckpt, plan


def test_a_lora_checkpoint_converts_to_a_peft_adapter_peft_loads(dpoc_cli, trained, tmp_path):
    model, base, ckpt, plan = trained
    result = dpoc_cli("convert", "mcore-to-hf", ckpt, tmp_path / "adapter", "--plan", plan)
    assert result.code == 0, result.err
    config = json.loads((tmp_path / "adapter" / peft.CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(base) and config["r"] == 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(make_model("qwen3"), tmp_path / "adapter")
    assert not [str(w.message) for w in caught if "peft" in w.filename]
    tokens = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_merge_writes_the_base_with_the_adapters_merged_in(dpoc_cli, trained, tmp_path):
    model, base, ckpt, plan = trained
    result = dpoc_cli("convert", "mcore-to-hf", ckpt, tmp_path / "merged", "--plan", plan, "--merge")
    assert result.code == 0, result.err
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == sorted(p.name for p in base.iterdir())
    theirs = model.merge_and_unload()
    ours = type(theirs).from_pretrained(tmp_path / "merged", dtype=torch.float32).state_dict()
    assert all(torch.equal(ours[k], v) for k, v in theirs.state_dict().items())
    tokens = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(logits(tmp_path / "merged", tokens), theirs(tokens).logits)


def test_merge_refuses_a_base_that_changed_and_a_full_checkpoint(dpoc_cli, trained, tmp_path):
    _, base, ckpt, plan = trained
    make_model("qwen3", seed=5).save_pretrained(base)  # other weights at the base's path
    result = dpoc_cli("convert", "mcore-to-hf", ckpt, tmp_path / "m", "--plan", plan, "--merge")
    assert result.code == 2 and not (tmp_path / "m").exists()
    assert f"{ckpt}: lora base: {base} now holds other weights (sha256 " in result.err
    assert "than the base the adapters were trained on" in result.err
    result = dpoc_cli("convert", "mcore-to-hf", ckpt, tmp_path / "m", "--merge")
    assert result.code == 2 and "--plan: a LoRA checkpoint holds only adapters: give --plan" in result.err


def test_merge_into_a_converted_base_goes_out_through_the_converter(dpoc_cli, trained, tmp_path):
    """A run that started from `checkpoint.init: converted`: its base is a distributed checkpoint, which the
    merge converts to Hugging Face with the adapters folded into each tensor."""
    from dpoc.runtime.weights.converter import hf_to_mcore

    model, base, _, plan = trained
    hf_to_mcore(str(base), str(tmp_path / "converted"))
    ckpt = tmp_path / "ckpt2"
    ckpt.mkdir()
    adapters = peft.from_peft(get_peft_model_state_dict(model), _arch(model), LORA, "peft")
    _save_lora_checkpoint(ckpt, adapters, tmp_path / "converted", kind="checkpoint")
    result = dpoc_cli("convert", "mcore-to-hf", ckpt, tmp_path / "merged", "--plan", plan, "--merge")
    assert result.code == 0, result.err
    theirs = model.merge_and_unload().state_dict()
    ours = type(model.get_base_model()).from_pretrained(tmp_path / "merged", dtype=torch.float32).state_dict()
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())
