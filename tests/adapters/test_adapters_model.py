"""AdapterModel behaviour: merging, several adapters, trainable parameters, a short training run."""

from __future__ import annotations

import copy
import os
import re
import warnings

import pytest
import torch

from raypeft.adapters import AdapterModel, LoraConfig, LoraLinear, get_adapter_model

peft = pytest.importorskip("peft")


def _cfg(**kw) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **kw})


# ---------------------------------------------------------------------- merging
@pytest.mark.parametrize(
    "kwargs",
    [dict(target_modules="all-linear"), dict(target_modules=["embed_tokens", "v_proj"], modules_to_save=["lm_head"])],
)
def test_merge_and_unload_matches_unmerged(llama, llama_base, input_ids, fwd, kwargs):
    model = get_adapter_model(llama, _cfg(**kwargs))
    if "modules_to_save" in kwargs:
        with torch.no_grad():
            model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    before = fwd(model, input_ids)
    merged = model.merge_and_unload()
    assert type(merged) is type(llama_base)
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert not any("lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    assert (fwd(merged, input_ids) - before).abs().max() <= 1e-5
    assert (before - fwd(llama_base, input_ids)).abs().max() > 1e-3


def test_merge_gpt2_conv1d(gpt2, input_ids, fwd):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_adapter_model(gpt2, _cfg(target_modules="all-linear"))
    before = fwd(model, input_ids)
    merged = model.merge_and_unload()
    assert (fwd(merged, input_ids) - before).abs().max() <= 1e-5


def test_unmerge_restores_base_weights(llama, input_ids, fwd):
    original = {n: p.detach().clone() for n, p in llama.named_parameters()}
    model = get_adapter_model(llama, _cfg(target_modules=["q_proj", "down_proj", "embed_tokens"]))
    unmerged = fwd(model, input_ids)
    model.merge_adapter()
    assert (fwd(model, input_ids) - unmerged).abs().max() <= 1e-5
    model.unmerge_adapter()
    root = model.get_base_model()
    for name, param in root.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert (param - original[key]).abs().max() <= 1e-6, name
    assert (fwd(model, input_ids) - unmerged).abs().max() <= 1e-6


def test_disable_adapter_gives_base_output_even_when_merged(llama, llama_base, input_ids, fwd):
    model = get_adapter_model(llama, _cfg(target_modules="all-linear", modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(2.0)
    adapted = fwd(model, input_ids)
    base = fwd(llama_base, input_ids)
    with model.disable_adapter():
        assert torch.equal(fwd(model, input_ids), base)
    assert torch.equal(fwd(model, input_ids), adapted)
    model.merge_adapter()
    with model.disable_adapter():
        assert (fwd(model, input_ids) - base).abs().max() <= 1e-5
    assert (fwd(model, input_ids) - adapted).abs().max() <= 1e-5


# ---------------------------------------------------------------------- several adapters
def test_multi_adapter_switch_delete_and_save(llama, llama_base, input_ids, fwd, tmp_path):
    torch.manual_seed(1)
    model = get_adapter_model(llama, _cfg(target_modules=["q_proj", "v_proj"]), adapter_name="default")
    model.add_adapter("other", _cfg(target_modules=["o_proj"], r=2))
    assert model.active_adapter == "default"  # add_adapter does not activate (as in peft)
    out_default = fwd(model, input_ids)
    model.set_adapter("other")
    assert model.active_adapter == "other"
    out_other = fwd(model, input_ids)
    base = fwd(llama_base, input_ids)
    assert (out_default - out_other).abs().max() > 1e-3
    assert (out_other - base).abs().max() > 1e-3
    # only the active adapter trains
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".other." in n for n in trainable)

    model.save_pretrained(tmp_path, selected_adapters=["default", "other"])
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "other" / "adapter_config.json")
    assert os.path.isfile(tmp_path / "other" / "adapter_model.safetensors")

    # peft reads the subfolder layout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(llama_base), str(tmp_path))
        theirs.load_adapter(str(tmp_path / "other"), adapter_name="other")
    theirs.eval()
    assert (fwd(theirs, input_ids) - out_default).abs().max() <= 1e-5
    theirs.set_adapter("other")
    assert (fwd(theirs, input_ids) - out_other).abs().max() <= 1e-5

    # and so do we
    again = AdapterModel.from_pretrained(copy.deepcopy(llama_base), tmp_path)
    again.load_adapter(tmp_path / "other", adapter_name="other")
    assert (fwd(again, input_ids) - out_default).abs().max() <= 1e-6
    again.set_adapter("other")
    assert (fwd(again, input_ids) - out_other).abs().max() <= 1e-6

    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert torch.equal(fwd(model, input_ids), out_default)
    assert not any(".other" in n for n, _ in model.named_parameters())
    model.delete_adapter("default")
    # no adapter left: every wrapper is gone and the model is the base again
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert torch.equal(fwd(model, input_ids), base)


def test_selected_adapters_saves_only_those(llama, tmp_path):
    model = get_adapter_model(llama, _cfg(target_modules=["q_proj"]))
    model.add_adapter("b", _cfg(target_modules=["k_proj"]))
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    assert not os.path.exists(tmp_path / "adapter_config.json")
    assert os.path.isfile(tmp_path / "b" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="unknown adapter"):
        model.save_pretrained(tmp_path, selected_adapters=["nope"])


def test_duplicate_adapter_name_rejected(llama):
    model = get_adapter_model(llama, _cfg(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", _cfg(target_modules=["q_proj"]))


# ---------------------------------------------------------------------- parameters
@pytest.mark.parametrize(
    "base_name,kwargs",
    [
        ("llama", dict(target_modules=["q_proj", "v_proj"])),
        ("llama", dict(target_modules="all-linear", modules_to_save=["lm_head"])),
        ("llama", dict(target_modules=["embed_tokens", "up_proj"], layers_to_transform=0)),
        ("gpt2", dict(target_modules="all-linear", bias="all")),
        ("gpt2", dict(target_modules=["c_attn"], bias="lora_only", rank_pattern={"c_attn": 2})),
    ],
)
def test_trainable_counts_match_peft(base_name, kwargs, llama_base, gpt2_base):
    base = llama_base if base_name == "llama" else gpt2_base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = get_adapter_model(copy.deepcopy(base), LoraConfig(**kwargs))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.get_nb_trainable_parameters()[0] > 0


def test_print_trainable_parameters_format(llama, capsys):
    model = get_adapter_model(llama, LoraConfig(target_modules=["q_proj", "v_proj"]))
    trainable, total = model.get_nb_trainable_parameters()
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    assert line == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", line)


def test_inference_mode_load_is_frozen(llama, llama_base, tmp_path):
    get_adapter_model(llama, _cfg(target_modules=["q_proj"])).save_pretrained(tmp_path)
    frozen = AdapterModel.from_pretrained(copy.deepcopy(llama_base), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    trainable = AdapterModel.from_pretrained(copy.deepcopy(llama_base), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 2 * (4 * 32 + 32 * 4)


def test_attribute_fallthrough_and_generate(llama, input_ids):
    model = get_adapter_model(llama, LoraConfig(target_modules=["q_proj"]))
    assert model.config is llama.config
    assert model.device == torch.device("cpu")
    assert model.get_base_model() is llama
    out = model.generate(input_ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, input_ids.shape[1] + 3)
    # peft-style parameter names, so full state dicts line up with PeftModel's
    assert any(n.startswith("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default") for n in model.state_dict())


# ---------------------------------------------------------------------- training
def test_short_training_reduces_loss_and_leaves_base_untouched(llama, input_ids):
    torch.manual_seed(0)
    model = get_adapter_model(llama, LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.Adam(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(20):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
