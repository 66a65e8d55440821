"""LoRA layer math against hand-written formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from raypeft.adapters import LoraConfig, LoraEmbedding, LoraLinear


def _wrap(module: nn.Module, **cfg) -> nn.Module:
    config = LoraConfig(**cfg)
    layer = config.create_layer(module, "default", "layer")
    layer.set_adapter("default")
    return layer


@pytest.mark.parametrize("use_rslora", [False, True])
def test_linear_matches_formula(use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = _wrap(base, r=4, lora_alpha=6, init_lora_weights=False, use_rslora=use_rslora)
    x = torch.randn(3, 5, 16)
    a = layer.lora_A["default"].weight
    b = layer.lora_B["default"].weight
    scale = 6 / math.sqrt(4) if use_rslora else 6 / 4
    expected = x @ base.weight.T + base.bias + scale * (x @ a.T @ b.T)
    assert layer.scaling["default"] == pytest.approx(scale)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert (layer(x) - base(x)).abs().max() > 1e-3  # the update is really there


def test_conv1d_fan_in_fan_out():
    torch.manual_seed(0)
    base = Conv1D(12, 16)  # nf=out=12, nx=in=16; weight stored (in, out)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        layer = config.create_layer(base, "default", "attn.c_attn")
    assert config.fan_in_fan_out is True
    layer.set_adapter("default")
    x = torch.randn(2, 3, 16)
    a = layer.lora_A["default"].weight  # (r, in)
    b = layer.lora_B["default"].weight  # (out, r)
    assert a.shape == (4, 16) and b.shape == (12, 4)
    expected = x @ base.weight + base.bias + 2.0 * (x @ a.T @ b.T)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    # the merge delta is laid out like Conv1D's (in, out) weight
    delta = layer.get_delta_weight("default")
    assert delta.shape == base.weight.shape
    assert torch.allclose(delta, 2.0 * (b @ a).T)


def test_embedding_matches_formula():
    torch.manual_seed(0)
    base = nn.Embedding(20, 8, padding_idx=0)
    layer = _wrap(base, r=4, lora_alpha=8, init_lora_weights=False)
    assert isinstance(layer, LoraEmbedding)
    a = layer.lora_embedding_A["default"]  # (r, num_embeddings)
    b = layer.lora_embedding_B["default"]  # (dim, r)
    assert a.shape == (4, 20) and b.shape == (8, 4)
    ids = torch.tensor([[1, 5, 0, 19]])
    one_hot = nn.functional.one_hot(ids, 20).float()
    expected = base.weight[ids] + 2.0 * (one_hot @ a.T @ b.T)
    assert torch.allclose(layer(ids), expected, atol=1e-6)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_init_gives_base_output(init):
    torch.manual_seed(0)
    lin = nn.Linear(16, 12)
    emb = nn.Embedding(20, 8)
    x = torch.randn(4, 16)
    ids = torch.randint(0, 20, (2, 5))
    base_lin, base_emb = lin(x), emb(ids)
    lin_layer = _wrap(lin, r=4, init_lora_weights=init)
    emb_layer = _wrap(emb, r=4, init_lora_weights=init)
    assert torch.equal(lin_layer(x), base_lin)
    assert torch.equal(emb_layer(ids), base_emb)
    assert torch.count_nonzero(lin_layer.lora_A["default"].weight) > 0
    assert torch.count_nonzero(lin_layer.lora_B["default"].weight) == 0
    if init is True:  # kaiming-uniform(a=sqrt(5)) on (r, in) is bounded by 1/sqrt(in)
        bound = 1 / math.sqrt(16)
        assert lin_layer.lora_A["default"].weight.abs().max() <= bound


def test_merge_unmerge_linear_and_embedding():
    torch.manual_seed(0)
    for base, x in ((nn.Linear(16, 12), torch.randn(4, 16)), (nn.Embedding(20, 8), torch.randint(0, 20, (3, 4)))):
        original = base.weight.detach().clone()
        layer = _wrap(base, r=4, lora_alpha=16, init_lora_weights=False)
        with torch.no_grad():
            unmerged = layer(x)
        layer.merge()
        assert layer.merged_adapters == ["default"]
        with torch.no_grad():
            assert torch.allclose(layer(x), unmerged, atol=1e-5)
        layer.merge()  # merging twice must not add the delta twice
        with torch.no_grad():
            assert torch.allclose(layer(x), unmerged, atol=1e-5)
        layer.unmerge()
        assert not layer.merged
        assert torch.allclose(base.weight, original, atol=1e-6)


def test_dropout_only_when_training_and_p_positive():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    layer = _wrap(base, r=4, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(64, 16)
    layer.eval()
    with torch.no_grad():
        a, b = layer(x), layer(x)
    assert torch.equal(a, b)
    layer.train()
    with torch.no_grad():
        c = layer(x)
    assert not torch.allclose(a, c)
    no_drop = _wrap(nn.Linear(16, 12), r=4, lora_dropout=0.0)
    assert isinstance(no_drop.lora_dropout["default"], nn.Identity)
    assert not no_drop._dropout_on


def test_multiple_adapters_in_one_layer_and_disable():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    config = LoraConfig(r=2, init_lora_weights=False)
    layer = config.create_layer(base, "a", "m")
    config.update_layer(layer, "b", "m")
    x = torch.randn(3, 8)
    with torch.no_grad():
        layer.set_adapter("a")
        out_a = layer(x)
        layer.set_adapter("b")
        out_b = layer(x)
        layer.set_adapter(["a", "b"])
        out_ab = layer(x)
        base_out = base(x)
        layer.disable_adapters = True
        assert torch.equal(layer(x), base_out)
    assert torch.allclose(out_ab - base_out, (out_a - base_out) + (out_b - base_out), atol=1e-6)
    layer.delete_adapter("a")
    assert layer.adapter_names == ["b"]


def test_lower_precision_input_is_computed_in_adapter_dtype():
    torch.manual_seed(0)
    base = nn.Linear(8, 8).to(torch.bfloat16)
    layer = _wrap(base, r=2, init_lora_weights=False)
    assert layer.lora_A["default"].weight.dtype == torch.bfloat16  # created in the base dtype
    out = layer(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_rank_and_alpha_patterns():
    config = LoraConfig(r=8, lora_alpha=16, rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\.\w+\.v_proj": 4})
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 8
    assert config.scaling_for("model.layers.0.self_attn.q_proj") == 16 / 2
    assert config.scaling_for("model.layers.1.self_attn.v_proj") == 4 / 8
    layer = config.create_layer(nn.Linear(8, 8), "default", "model.layers.0.self_attn.q_proj")
    assert isinstance(layer, LoraLinear)
    assert layer.lora_A["default"].weight.shape == (2, 8)


def test_unsupported_module_type_is_a_clear_error():
    with pytest.raises(TypeError, match="LayerNorm"):
        LoraConfig().create_layer(nn.LayerNorm(8), "default", "norm")
