"""DoRA (``use_dora=True``): math against the paper's formula, merging, and peft interop both ways.

The formula written out here: ``W' = m * (W + s B A) / ||W + s B A||`` with the norm per output
feature (row of the ``(out, in)`` weight) and detached from the graph; ``y = W' x + b``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from raypeft.adapters import AdapterModel, LoraConfig, LoraEmbedding, LoraLinear, get_adapter_model, load_config

peft = pytest.importorskip("peft")

TOL = 1e-5
DORA = dict(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _wrap(module: nn.Module, name: str = "layer", **cfg) -> nn.Module:
    config = LoraConfig(use_dora=True, **cfg)
    layer = _quiet(config.create_layer, module, "default", name)
    layer.set_adapter("default")
    return layer


def _perturb_magnitudes(model: nn.Module, seed: int = 7) -> None:
    """Move each magnitude away from its initial value (the norm), where DoRA equals plain LoRA."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.5 * torch.rand(param.shape, generator=gen))


def _dora_weight(weight_oi: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, m: torch.Tensor) -> torch.Tensor:
    """The paper's W' in (out, in) layout, the norm detached."""
    direction = weight_oi + s * (b @ a)
    return m[:, None] * direction / direction.norm(dim=1, keepdim=True).detach()


# ---------------------------------------------------------------------- math
def test_linear_matches_formula_and_starts_as_lora():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = _wrap(base, r=4, lora_alpha=6, init_lora_weights=False)
    assert isinstance(layer, LoraLinear)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    x = torch.randn(3, 5, 16)
    s = 6 / 4
    # magnitude starts at ||W + s B A|| per output, so the fresh layer computes plain LoRA
    assert m.shape == (12,)
    assert torch.allclose(m, (base.weight + s * b @ a).norm(dim=1), atol=1e-6)
    lora = x @ base.weight.T + base.bias + s * (x @ a.T @ b.T)
    assert torch.allclose(layer(x), lora, atol=1e-5)
    _perturb_magnitudes(layer)
    expected = x @ _dora_weight(base.weight, a, b, s, m).T + base.bias
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert (layer(x) - lora).abs().max() > 1e-2  # the magnitude really acts


def test_gradients_treat_the_norm_as_a_constant():
    torch.manual_seed(0)
    base = nn.Linear(10, 6).requires_grad_(False)
    layer = _wrap(base, r=3, lora_alpha=3, init_lora_weights=False)
    _perturb_magnitudes(layer)
    x = torch.randn(4, 10)
    target = torch.randn(4, 6)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    ((layer(x) - target) ** 2).sum().backward()
    ours = [t.grad.clone() for t in (a, b, m)]
    for t in (a, b, m):
        t.grad = None
    ref = x @ _dora_weight(base.weight, a, b, 1.0, m).T + base.bias
    ((ref - target) ** 2).sum().backward()
    for got, want in zip(ours, (a.grad, b.grad, m.grad)):
        assert torch.allclose(got, want, atol=1e-5)


def test_dropout_path_matches_formula_on_the_dropped_input():
    torch.manual_seed(0)
    base = nn.Linear(8, 8, bias=True)
    layer = _wrap(base, r=2, lora_alpha=2, lora_dropout=0.5, init_lora_weights=False)  # scaling 1
    _perturb_magnitudes(layer)
    layer.train()
    x = torch.randn(64, 8)
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    dropped = layer.lora_dropout["default"](x)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    norm = (base.weight + b @ a).norm(dim=1)
    f = m / norm
    expected = base(x) + (f - 1) * (dropped @ base.weight.T) + f * (dropped @ a.T @ b.T)
    assert torch.allclose(out, expected, atol=1e-5)


def test_conv1d_matches_formula():
    torch.manual_seed(0)
    base = Conv1D(12, 16)  # weight (in=16, out=12)
    layer = _wrap(base, "attn.c_attn", r=4, lora_alpha=8, init_lora_weights=False)
    _perturb_magnitudes(layer)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    assert m.shape == (12,)
    x = torch.randn(2, 3, 16)
    expected = x @ _dora_weight(base.weight.T, a, b, 2.0, m).T + base.bias
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_embedding_matches_formula():
    torch.manual_seed(0)
    base = nn.Embedding(20, 8, padding_idx=0)
    layer = _wrap(base, r=4, lora_alpha=8, init_lora_weights=False)
    assert isinstance(layer, LoraEmbedding)
    _perturb_magnitudes(layer)
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]  # (r, num), (dim, r)
    m = layer.lora_magnitude_vector["default"].weight
    assert m.shape == (8,)  # one magnitude per embedding dimension
    merged_t = _dora_weight(base.weight.T, a, b, 2.0, m)  # (dim, num)
    ids = torch.tensor([[1, 5, 0, 19]])
    assert torch.allclose(layer(ids), merged_t.T[ids], atol=1e-5)


# ---------------------------------------------------------------------- merging
@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_merge_equals_forward_and_unmerge_restores(kind):
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(16, 12), torch.randn(4, 16)
    elif kind == "conv1d":
        base, x = Conv1D(12, 16), torch.randn(4, 16)
    else:
        base, x = nn.Embedding(20, 8), torch.randint(0, 20, (3, 4))
    original = base.weight.detach().clone()
    layer = _wrap(base, r=4, lora_alpha=16, init_lora_weights=False)
    _perturb_magnitudes(layer)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged_adapters == ["default"]
        assert torch.allclose(layer(x), unmerged, atol=1e-5)
        assert torch.allclose(layer.base_layer(x), unmerged, atol=1e-5)
        layer.merge()  # no double merge
        assert torch.allclose(layer(x), unmerged, atol=1e-5)
        layer.unmerge()
    assert not layer.merged
    assert torch.allclose(base.weight, original, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_two_adapters_merged_together_equal_both_active(kind):
    """DoRA merges as an additive (f - 1) W0 + f dW, so any set of merged adapters equals that set
    active in forward, and unmerging in any state recovers W0."""
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(12, 10), torch.randn(5, 12)
    else:
        base, x = nn.Embedding(12, 10), torch.randint(0, 12, (2, 5))
    original = base.weight.detach().clone()
    dora = LoraConfig(r=3, lora_alpha=6, init_lora_weights=False, use_dora=True)
    plain = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False)
    layer = dora.create_layer(base, "d1", "m")
    plain.update_layer(layer, "p", "m")
    dora.update_layer(layer, "d2", "m")
    _perturb_magnitudes(layer)
    with torch.no_grad():
        layer.set_adapter(["d1", "p", "d2"])
        together = layer(x)
        layer.merge(["d1", "p"])
        assert torch.allclose(layer(x), together, atol=1e-5)  # d2 still in forward
        layer.merge(["d2"])
        assert torch.allclose(layer(x), together, atol=1e-5)
        layer.unmerge()
    assert torch.allclose(base.weight, original, atol=1e-5)
    assert not layer._dora_factors


def test_model_merge_and_unload(llama, input_ids, fwd):
    torch.manual_seed(1)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, use_dora=True)
    model = get_adapter_model(llama, config)
    _perturb_magnitudes(model)
    before = fwd(model, input_ids)
    plain = model.merge_and_unload()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    assert (fwd(plain, input_ids) - before).abs().max() <= TOL


# ---------------------------------------------------------------------- training and files
def test_magnitude_trains_and_is_saved_with_peft_keys(llama, tmp_path):
    model = get_adapter_model(llama, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], use_dora=True))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight" in trainable
    assert "base_model.model.model.embed_tokens.lora_magnitude_vector.default.weight" in trainable
    sd = model.adapter_state_dict()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in sd
    assert sd["base_model.model.model.embed_tokens.lora_magnitude_vector"].shape == (32,)
    model.save_pretrained(tmp_path)
    assert load_config(tmp_path).use_dora is True


def test_saved_keys_match_peft(llama_base, gpt2_base):
    for base, kwargs in (
        (llama_base, dict(target_modules=["q_proj", "v_proj", "embed_tokens"])),
        (gpt2_base, dict(target_modules=["c_attn", "c_fc"])),
    ):
        ours = _quiet(get_adapter_model, copy.deepcopy(base), LoraConfig(use_dora=True, **kwargs))
        theirs = _quiet(peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(use_dora=True, **kwargs))
        peft_sd = _quiet(peft.get_peft_model_state_dict, theirs)
        ours_sd = ours.adapter_state_dict()
        adapter_keys = {k for k in peft_sd if "lora_" in k}  # peft also saves the embedding's base weight
        assert set(ours_sd) == adapter_keys
        assert all(ours_sd[k].shape == peft_sd[k].shape for k in ours_sd)
        # full-model parameter names also line up
        ours_names = {n for n, _ in ours.named_parameters() if "lora_" in n}
        theirs_names = {n for n, _ in theirs.named_parameters() if "lora_" in n}
        assert ours_names == theirs_names


LLAMA_CASES = {
    "q_v": dict(target_modules=["q_proj", "v_proj"]),
    "all_linear_dropout": dict(target_modules="all-linear", lora_dropout=0.1, use_rslora=True),
    "embedding": dict(target_modules=["embed_tokens", "o_proj"]),
}
GPT2_CASES = {"conv1d": dict(target_modules=["c_attn", "c_proj"])}


def _cases():
    for name, kwargs in LLAMA_CASES.items():
        yield pytest.param("llama_base", kwargs, id=f"llama-{name}")
    for name, kwargs in GPT2_CASES.items():
        yield pytest.param("gpt2_base", kwargs, id=f"gpt2-{name}")


@pytest.mark.parametrize("fixture,kwargs", list(_cases()))
def test_raypeft_to_peft(fixture, kwargs, request, input_ids, fwd, tmp_path):
    base = request.getfixturevalue(fixture)
    torch.manual_seed(1)
    ours = _quiet(get_adapter_model, copy.deepcopy(base), LoraConfig(**DORA, **kwargs))
    _perturb_magnitudes(ours)
    ours.eval().save_pretrained(tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), str(tmp_path)).eval()
    out = fwd(ours, input_ids)
    assert (out - fwd(base, input_ids)).abs().max() > 1e-3
    assert (out - fwd(theirs, input_ids)).abs().max() <= TOL


@pytest.mark.parametrize("fixture,kwargs", list(_cases()))
def test_peft_to_raypeft(fixture, kwargs, request, input_ids, fwd, tmp_path):
    base = request.getfixturevalue(fixture)
    torch.manual_seed(1)
    theirs = _quiet(
        peft.get_peft_model, copy.deepcopy(base), peft.LoraConfig(**DORA, **kwargs)
    )
    _perturb_magnitudes(theirs)
    theirs.eval()
    _quiet(theirs.save_pretrained, str(tmp_path))
    ours = _quiet(AdapterModel.from_pretrained, copy.deepcopy(base), tmp_path).eval()
    assert ours.peft_config["default"].use_dora is True
    out = fwd(theirs, input_ids)
    assert (out - fwd(base, input_ids)).abs().max() > 1e-3
    assert (fwd(ours, input_ids) - out).abs().max() <= TOL


def test_merged_logits_match_peft_merged(llama_base, input_ids, fwd, tmp_path):
    torch.manual_seed(1)
    kwargs = dict(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True, target_modules=["q_proj", "down_proj"])
    ours = get_adapter_model(copy.deepcopy(llama_base), LoraConfig(**kwargs))
    _perturb_magnitudes(ours)
    ours.eval().save_pretrained(tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(llama_base), str(tmp_path)).eval()
    ours_merged = ours.merge_and_unload()
    theirs_merged = _quiet(theirs.merge_and_unload)
    assert (fwd(ours_merged, input_ids) - fwd(theirs_merged, input_ids)).abs().max() <= TOL
