"""(IA)^3: forward against the formula, merging, PEFT interop both ways, defaults, training."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from raypeft.adapters import AdapterModel, IA3Config, IA3Layer, get_adapter_model, load_config

peft = pytest.importorskip("peft")

TOL = 1e-5


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _wrap(base: nn.Module, feedforward: bool, **cfg) -> IA3Layer:
    config = IA3Config(target_modules=["m"], feedforward_modules=["m"] if feedforward else [], **cfg)
    layer = _quiet(config.create_layer, base, "default", "block.m")
    layer.set_adapter("default")
    return layer


# ---------------------------------------------------------------------- math
@pytest.mark.parametrize("feedforward", [False, True])
def test_linear_matches_formula(feedforward):
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = _wrap(base, feedforward, init_ia3_weights=False)
    l = layer.ia3_l["default"]
    assert l.shape == ((1, 6) if feedforward else (5, 1))
    x = torch.randn(2, 3, 6)
    w, b = base.weight, base.bias
    if feedforward:
        expected = (x * l.view(6)) @ w.T + b
    else:
        expected = (x @ w.T + b) * l.view(5)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert (layer(x) - base(x)).abs().max() > 1e-3


@pytest.mark.parametrize("feedforward", [False, True])
def test_conv1d_matches_formula(feedforward):
    torch.manual_seed(0)
    base = Conv1D(5, 6)  # nf=out=5, nx=in=6; weight stored (in, out)
    config = IA3Config(target_modules=["m"], feedforward_modules=["m"] if feedforward else [], init_ia3_weights=False)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        layer = config.create_layer(base, "default", "m")
    assert config.fan_in_fan_out is True
    layer.set_adapter("default")
    l = layer.ia3_l["default"]
    x = torch.randn(4, 6)
    if feedforward:
        expected = (x * l.view(6)) @ base.weight + base.bias
    else:
        expected = (x @ base.weight + base.bias) * l.view(5)
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_fresh_adapter_is_identity_and_adapters_multiply():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    config = IA3Config(target_modules=["m"], feedforward_modules=[])
    layer = config.create_layer(base, "a", "m")
    x = torch.randn(3, 6)
    layer.set_adapter("a")
    assert torch.equal(layer(x), base(x))
    ff = IA3Config(target_modules=["m"], feedforward_modules=["m"], init_ia3_weights=False)
    ff.update_layer(layer, "b", "m")
    with torch.no_grad():
        layer.ia3_l["a"].normal_()
    layer.set_adapter(["a", "b"])
    la, lb = layer.ia3_l["a"].view(5), layer.ia3_l["b"].view(6)
    expected = ((x * lb) @ base.weight.T + base.bias) * la
    assert torch.allclose(layer(x), expected, atol=1e-6)


# ---------------------------------------------------------------------- merging
@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_merge_unmerge_equivalence(model_name, request, input_ids, fwd):
    base = request.getfixturevalue(f"{model_name}_base")
    torch.manual_seed(3)
    model = _quiet(get_adapter_model, copy.deepcopy(base), IA3Config(init_ia3_weights=False)).eval()
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
    adapted = fwd(model, input_ids)
    assert (adapted - fwd(base, input_ids)).abs().max() > 1e-3
    model.merge_adapter()
    assert (fwd(model, input_ids) - adapted).abs().max() <= TOL
    model.unmerge_adapter()
    after = model.get_base_model().state_dict()
    assert max((after[k] - v).abs().max().item() for k, v in before.items()) <= 1e-5
    assert (fwd(model, input_ids) - adapted).abs().max() <= TOL
    with model.disable_adapter():
        assert (fwd(model, input_ids) - fwd(base, input_ids)).abs().max() <= TOL
    merged = model.merge_and_unload()
    assert not any(isinstance(m, IA3Layer) for m in merged.modules())
    assert (fwd(merged, input_ids) - adapted).abs().max() <= TOL


def test_merge_with_zero_entry_unmerges_exactly():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    original_w, original_b = base.weight.detach().clone(), base.bias.detach().clone()
    layer = _wrap(base, feedforward=False, init_ia3_weights=False)
    with torch.no_grad():
        layer.ia3_l["default"][2] = 0.0
    x = torch.randn(3, 6)
    expected = layer(x)
    layer.merge()
    assert torch.allclose(layer(x), expected, atol=1e-6)
    layer.unmerge()
    assert torch.equal(base.weight, original_w) and torch.equal(base.bias, original_b)


# ---------------------------------------------------------------------- defaults and config
def test_defaults_resolve_per_architecture(llama, gpt2):
    model = get_adapter_model(llama, IA3Config())
    config = model.peft_config["default"]
    assert config.target_modules == ["k_proj", "v_proj", "down_proj"]
    assert config.feedforward_modules == ["down_proj"]
    layer = model.get_base_model().model.layers[0]
    assert layer.mlp.down_proj.is_feedforward["default"] is True
    assert layer.self_attn.k_proj.is_feedforward["default"] is False
    gpt = _quiet(get_adapter_model, gpt2, IA3Config())
    assert gpt.peft_config["default"].feedforward_modules == ["mlp.c_proj"]
    assert gpt.get_base_model().transformer.h[0].mlp.c_proj.is_feedforward["default"] is True
    assert gpt.get_base_model().transformer.h[0].attn.c_attn.is_feedforward["default"] is False
    assert not isinstance(gpt.get_base_model().transformer.h[0].attn.c_proj, IA3Layer)


def test_config_errors():
    with pytest.raises(ValueError, match="feedforward_modules must be a subset of target_modules"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="init_ia3_weights"):
        IA3Config(init_ia3_weights="yes")


def test_unknown_architecture_needs_explicit_modules():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="target_modules is not set"):
        get_adapter_model(model, IA3Config())
    with pytest.raises(ValueError, match="feedforward_modules is not set"):
        get_adapter_model(copy.deepcopy(model), IA3Config(target_modules=["0"]))
    wrapped = get_adapter_model(copy.deepcopy(model), IA3Config(target_modules=["0"], feedforward_modules=[]))
    assert isinstance(wrapped.get_base_model()[0], IA3Layer)


# ---------------------------------------------------------------------- PEFT interop
CASES = {
    "llama_default": ("llama", {}),
    "llama_regex_ff": ("llama", dict(target_modules=r".*\.(k_proj|v_proj|up_proj)", feedforward_modules=r".*up_proj")),
    "gpt2_default": ("gpt2", {}),
    "gpt2_modules_to_save": ("gpt2", dict(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"],
                                          modules_to_save=["lm_head"])),
}


def _perturb_saved_modules(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_raypeft_to_peft(case, request, input_ids, fwd, tmp_path):
    model_name, kwargs = CASES[case]
    base = request.getfixturevalue(f"{model_name}_base")
    torch.manual_seed(1)
    ours = _quiet(get_adapter_model, copy.deepcopy(base), IA3Config(init_ia3_weights=False, **kwargs))
    _perturb_saved_modules(ours)
    ours.eval().save_pretrained(tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), str(tmp_path)).eval()
    ours_out = fwd(ours, input_ids)
    assert (ours_out - fwd(base, input_ids)).abs().max() > 1e-3
    assert (ours_out - fwd(theirs, input_ids)).abs().max() <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_to_raypeft(case, request, input_ids, fwd, tmp_path):
    model_name, kwargs = CASES[case]
    base = request.getfixturevalue(f"{model_name}_base")
    torch.manual_seed(1)
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(base), peft.IA3Config(init_ia3_weights=False, **kwargs))
    _perturb_saved_modules(theirs)
    theirs.eval()
    _quiet(theirs.save_pretrained, str(tmp_path))
    ours = _quiet(AdapterModel.from_pretrained, copy.deepcopy(base), tmp_path).eval()
    theirs_out = fwd(theirs, input_ids)
    assert (theirs_out - fwd(base, input_ids)).abs().max() > 1e-3
    assert (fwd(ours, input_ids) - theirs_out).abs().max() <= TOL


def test_saved_keys_and_config_match_peft(llama_base, tmp_path):
    ours = get_adapter_model(copy.deepcopy(llama_base), IA3Config())
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(llama_base), peft.IA3Config())
    peft_sd = _quiet(peft.get_peft_model_state_dict, theirs)
    ours_sd = ours.adapter_state_dict()
    assert set(ours_sd) == set(peft_sd)
    assert all(ours_sd[k].shape == peft_sd[k].shape for k in ours_sd)
    ours.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "IA3"
    loaded = _quiet(peft.IA3Config.from_pretrained, str(tmp_path))
    assert set(loaded.target_modules) == {"k_proj", "v_proj", "down_proj"}
    assert set(loaded.feedforward_modules) == {"down_proj"}
    assert isinstance(load_config(tmp_path), IA3Config)


# ---------------------------------------------------------------------- training
def test_training_lowers_the_loss(llama):
    torch.manual_seed(0)
    # every projection scaled (input side for the MLP's down projection): enough capacity to move a
    # randomly initialised model's near-uniform predictions
    model = get_adapter_model(llama, IA3Config(target_modules="all-linear", feedforward_modules=["down_proj"]))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dim() == 2 and 1 in p.shape for p in trainable)
    batch = torch.randint(1, 100, (4, 12), generator=torch.Generator().manual_seed(5))
    optimizer = torch.optim.Adam(trainable, lr=0.1)
    losses = []
    for _ in range(20):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_quantized_base_scales_its_output_and_refuses_merge():
    pytest.importorskip("bitsandbytes")
    from raypeft.adapters.quantization import quantize_linear_layers

    torch.manual_seed(0)
    base = quantize_linear_layers(nn.Sequential(nn.Linear(64, 64)), 4)[0]
    layer = _wrap(base, feedforward=False, init_ia3_weights=False)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.allclose(layer(x), base(x) * layer.ia3_l["default"].view(64), atol=1e-5)
    with pytest.raises(ValueError, match="quantized"):
        layer.merge()
    assert not layer.merged_adapters
