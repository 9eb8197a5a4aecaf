"""The PEFT adapter format, checked with PEFT itself on tiny HF models (random weights, GQA): an adapter PEFT
made, read into megatron-core's fused form and written back, is the same adapter; PeftModel loads what dpoc
writes with every key; dpoc's merge is PEFT's merge_and_unload; adapters with different A per fused part
fuse exactly (stacked) or are refused with the reason."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

from dpoc.contract import hf_config
from dpoc.contract.architecture import Architecture
from dpoc.contract.errors import DpocError
from dpoc.contract.lora import HF_TARGETS, Lora, mcore_targets
from dpoc.runtime.weights import peft, weight_map
from tests.runtime.hf_models import make_model

LORA = Lora(rank=4, alpha=8.0, dropout=0.0, targets=mcore_targets(list(HF_TARGETS)), experts=False, init_from=None)


def _arch(model) -> Architecture:
    return Architecture.of(hf_config.architecture(model.config.to_dict(), "config.json"))


def _peft_model(name: str, hf_targets=HF_TARGETS, share_a: bool = True, seed: int = 1):
    """PEFT's LoRA on a tiny model, every A and B redrawn non-zero; with `share_a` the parts of each fused
    megatron linear (q/k/v, gate/up) get one A, as megatron-core's fused linear holds them."""
    model = get_peft_model(make_model(name), LoraConfig(r=4, lora_alpha=8, target_modules=list(hf_targets)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        shared: dict[tuple[str, str], torch.Tensor] = {}
        for pname, p in sorted(model.named_parameters()):
            if "lora_" not in pname:
                continue
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
            module = pname.split(".lora_")[0]
            group = module.rpartition(".")[0], "attn" if "self_attn" in module and "o_proj" not in module else "glu"
            if share_a and "lora_A" in pname and not module.endswith(("o_proj", "down_proj")):
                p.copy_(shared.setdefault(group, p.detach().clone()))
    return model


def _fused_delta(theirs: dict[str, torch.Tensor], site: peft.Site, arch: Architecture) -> torch.Tensor:
    """The HF adapters' updates B·A stacked in the fused weight's row order (as the converter stacks weights)."""
    def delta(module: str) -> torch.Tensor:
        return theirs[f"{peft.PREFIX}{module}.lora_B.weight"] @ theirs[f"{peft.PREFIX}{module}.lora_A.weight"]
    return torch.cat([delta(p.name.removesuffix(".weight"))[p.start:p.start + p.rows]
                      for p in weight_map.pieces(*site.weight(), arch)])


@pytest.mark.parametrize("name", ["qwen3", "llama"])
def test_a_peft_adapter_round_trips_through_the_fused_form(name, tmp_path):
    model = _peft_model(name)
    arch = _arch(model)
    theirs = {f"{peft.PREFIX}{k.removeprefix(peft.PREFIX)}": v for k, v in get_peft_model_state_dict(model).items()}
    ours = peft.from_peft(theirs, arch, LORA, "adapter")
    assert {s.target for s in ours} == set(LORA.targets) and len(ours) == 4 * arch.num_layers
    assert ours[peft.Site(0, "linear_qkv")][0].shape == (4, arch.hidden_size)  # shared A: rank r, not 3r
    back = peft.to_peft(ours, arch)
    assert back.keys() == theirs.keys()
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)

    base = tmp_path / "base"
    make_model(name).save_pretrained(base)
    peft.write(tmp_path / "out", ours, arch, LORA, base=str(base))
    config = json.loads((tmp_path / "out" / peft.CONFIG).read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == \
        ("LORA", 4, 8.0, str(base))
    assert sorted(config["target_modules"]) == sorted(HF_TARGETS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(make_model(name), tmp_path / "out")
    assert not [str(w.message) for w in caught if "peft" in w.filename]
    state = get_peft_model_state_dict(loaded)
    assert state.keys() == get_peft_model_state_dict(model).keys()
    assert all(torch.equal(state[k], v) for k, v in get_peft_model_state_dict(model).items())
    tokens = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_the_fused_adapter_updates_the_megatron_weight_in_its_own_row_order():
    """B's rows follow weight_map's fused order (q/k/v per query group, GQA sizes; [gate; up]): the fused
    update B·A is the HF updates stacked exactly as the converter stacks the weights."""
    model = _peft_model("qwen3")
    arch = _arch(model)
    theirs = get_peft_model_state_dict(model)
    ours = peft.from_peft(dict(theirs), arch, LORA, "adapter")
    for site in (peft.Site(1, "linear_qkv"), peft.Site(0, "linear_fc1")):
        a, b = ours[site]
        assert b.shape[0] == weight_map.hf_shape(*site.weight(), arch)[0]
        torch.testing.assert_close(b @ a, _fused_delta(theirs, site, arch), rtol=0, atol=1e-6)


def test_dpoc_merge_is_peft_merge_and_unload():
    model = _peft_model("qwen3")
    arch = _arch(model)
    base = {k: v.clone() for k, v in make_model("qwen3").state_dict().items()}
    adapters = peft.hf_adapters(peft.from_peft(get_peft_model_state_dict(model), arch, LORA, "adapter"), arch)
    theirs = model.merge_and_unload().state_dict()
    merged = {k: peft.merged(k, w, adapters, LORA.scaling) for k, w in base.items()}
    assert sum(not torch.equal(merged[k], base[k]) for k in base) == 7 * arch.num_layers
    assert all(torch.equal(merged[k], theirs[k]) for k in base), [k for k in base if not torch.equal(merged[k], theirs[k])]


def test_different_a_per_fused_part_stacks_exactly_or_is_refused(tmp_path):
    model = _peft_model("qwen3", share_a=False)
    arch = _arch(model)
    model.save_pretrained(tmp_path / "all")
    with pytest.raises(DpocError) as err:
        peft.load(tmp_path / "all", arch, LORA)
    assert str(err.value) == (
        f"{tmp_path / 'all'}: layer 0 linear_qkv: its q_proj, k_proj, v_proj adapters have different "
        "lora_A, which megatron-core's fused linear_qkv holds exactly only stacked at rank 12 (block-diagonal B), "
        "but lora.rank is 4 and dpoc's adapters have one rank (valid: lora.rank 12 with lora.alpha 24, when every "
        "adapter comes out at that rank; or an adapter whose fused linears share lora_A, as dpoc exports them)")

    # only q/k/v targeted: every site stacks to rank 12, which a rank-12 run at the same scaling holds exactly
    qkv = _peft_model("qwen3", hf_targets=("q_proj", "k_proj", "v_proj"), share_a=False)
    qkv.save_pretrained(tmp_path / "qkv")
    wide = dataclasses.replace(LORA, rank=12, alpha=24.0, targets=("linear_qkv",))
    stacked = peft.load(tmp_path / "qkv", arch, wide)
    a, b = stacked[peft.Site(0, "linear_qkv")]
    assert a.shape == (12, arch.hidden_size)
    assert (b != 0).sum() == b.shape[0] * 4  # block-diagonal: each row reads only its own block of 4
    torch.testing.assert_close(b @ a, _fused_delta(get_peft_model_state_dict(qkv), peft.Site(0, "linear_qkv"), arch),
                               rtol=0, atol=1e-6)
    # written back at rank 12, PEFT computes the same model as the original adapter
    peft.write(tmp_path / "back", stacked, arch, wide, base=None)
    loaded = PeftModel.from_pretrained(make_model("qwen3"), tmp_path / "back")
    tokens = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, qkv(tokens).logits, rtol=0, atol=1e-5)


def test_an_adapter_dpoc_cannot_load_exactly_is_refused(tmp_path):
    model = _peft_model("qwen3")
    arch = _arch(model)
    model.save_pretrained(tmp_path / "a")
    with pytest.raises(DpocError) as err:
        peft.load(tmp_path / "a", arch, dataclasses.replace(LORA, alpha=16.0))
    assert str(err.value) == (
        f"{tmp_path / 'a' / peft.CONFIG}: lora_alpha / r: 8/4 = 2, but lora.alpha / lora.rank is 16/4 = 4 (valid: "
        "the adapter's scaling, so that its update is kept exactly)")
    with pytest.raises(DpocError) as err:
        peft.load(tmp_path / "a", arch, dataclasses.replace(LORA, targets=("linear_qkv",)))
    assert str(err.value).startswith(f"{tmp_path / 'a'}: {peft.WEIGHTS}: model.layers.0.mlp.down_proj has an "
                                     "adapter that lora.targets does not select (loading it would drop it)")
    config = json.loads((tmp_path / "a" / peft.CONFIG).read_text())
    (tmp_path / "a" / peft.CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(DpocError, match=r"adapter_config.json: use_dora: True is not supported \(valid: False\)$"):
        peft.load(tmp_path / "a", arch, LORA)
    with pytest.raises(DpocError, match="not a PEFT adapter directory"):
        peft.load(tmp_path, arch, LORA)


def _moe_model(seed: int = 0):
    """A tiny Qwen3-MoE (transformers 5: each layer's experts are two 3D parameters), 2F != h so that a
    transposed expert adapter cannot pass."""
    import transformers

    from tests.runtime.hf_models import COMMON

    config = transformers.Qwen3MoeConfig(**{**COMMON, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                            "moe_intermediate_size": 24, "norm_topk_prob": True})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_expert_adapters_are_peft_target_parameters(tmp_path):
    model = get_peft_model(_moe_model(), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        shared: dict[str, torch.Tensor] = {}
        for pname, p in sorted(model.named_parameters()):
            if "lora_" in pname:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
                layer = pname.split(".self_attn.")[0]
                if "lora_A" in pname and any(f"{x}_proj" in pname for x in "qkv"):
                    p.copy_(shared.setdefault(layer, p.detach().clone()))
    arch = _arch(model)
    lora = Lora(rank=4, alpha=8.0, dropout=0.0, targets=mcore_targets(list(HF_TARGETS)), experts=True, init_from=None)
    theirs = get_peft_model_state_dict(model)
    ours = peft.from_peft(theirs, arch, lora, "adapter")
    assert len(ours) == arch.num_layers * (2 + 2 * arch.num_experts)
    a, b = ours[peft.Site(1, "linear_fc1", expert=2)]
    assert (a.shape, b.shape) == ((4, 64), (48, 4))  # one expert's fc1: [gate; up] rows of 2 x 24
    back = peft.to_peft(ours, arch)
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)

    peft.write(tmp_path / "out", ours, arch, lora, base=None)
    config = json.loads((tmp_path / "out" / peft.CONFIG).read_text())
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(_moe_model(), tmp_path / "out")
    assert not [str(w.message) for w in caught if "peft" in w.filename]
    tokens = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)

    # dpoc's merge, per expert as the converter names the weights, is PEFT's merge of the fused parameters
    merged_theirs = model.merge_and_unload().state_dict()
    adapters = peft.hf_adapters(ours, arch)
    base = _moe_model().state_dict()
    for layer in range(arch.num_layers):
        experts = f"model.layers.{layer}.mlp.experts."
        for e in range(arch.num_experts):
            gate, up, down = (peft.merged(f"{experts}{e}.{n}.weight", w, adapters, lora.scaling) for n, w in (
                ("gate_proj", base[experts + "gate_up_proj"][e, :24]), ("up_proj", base[experts + "gate_up_proj"][e, 24:]),
                ("down_proj", base[experts + "down_proj"][e])))
            torch.testing.assert_close(torch.cat([gate, up]), merged_theirs[experts + "gate_up_proj"][e],
                                       rtol=0, atol=1e-6)
            torch.testing.assert_close(down, merged_theirs[experts + "down_proj"][e], rtol=0, atol=1e-6)
