"""Bottleneck adapters (Houlsby / Pfeiffer): formula, placement, merge refusal, files, training."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from raypeft.adapters import AdapterModel, BottleneckConfig, BottleneckLayer, get_adapter_model, load_config

TOL = 1e-5


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _bottleneck(h: torch.Tensor, layer: BottleneckLayer, name: str, act) -> torch.Tensor:
    down, up = layer.adapter_down[name], layer.adapter_up[name]
    return h + (act(h @ down.weight.T + down.bias) @ up.weight.T + up.bias)


# ---------------------------------------------------------------------- math
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layer_matches_formula(kind):
    torch.manual_seed(0)
    base = nn.Linear(6, 8) if kind == "linear" else Conv1D(8, 6)  # Conv1D(nf=out, nx=in)
    config = BottleneckConfig(target_modules=["m"], bottleneck_size=3, non_linearity="gelu", init_weights=False)
    layer = config.create_layer(base, "default", "m")
    layer.set_adapter("default")
    assert layer.adapter_down["default"].weight.shape == (3, 8)  # applied to the output (8 features)
    x = torch.randn(2, 4, 6)
    h = base(x)
    expected = _bottleneck(h, layer, "default", torch.nn.functional.gelu)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert (layer(x) - h).abs().max() > 1e-3


def test_stacked_adapters_apply_in_sequence_and_fresh_adapters_are_identity():
    torch.manual_seed(0)
    base = nn.Linear(6, 8)
    layer = BottleneckConfig(target_modules=["m"], reduction_factor=2, init_weights=False).create_layer(base, "a", "m")
    BottleneckConfig(target_modules=["m"], bottleneck_size=2, non_linearity="silu", init_weights=False).update_layer(
        layer, "b", "m"
    )
    BottleneckConfig(target_modules=["m"], bottleneck_size=2).update_layer(layer, "fresh", "m")
    assert layer.adapter_down["a"].out_features == 4  # 8 // reduction_factor
    x = torch.randn(5, 6)
    layer.set_adapter(["a", "b"])
    relu, silu = torch.relu, torch.nn.functional.silu
    expected = _bottleneck(_bottleneck(base(x), layer, "a", relu), layer, "b", silu)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    layer.set_adapter("fresh")  # up-projection starts at zero: the base output exactly
    assert torch.equal(layer(x), base(x))
    layer.disable_adapters = True
    layer.set_adapter(["a", "b"])
    assert torch.equal(layer(x), base(x))


# ---------------------------------------------------------------------- placement
@pytest.mark.parametrize(
    "model_name, placement, expected",
    [
        ("llama", "houlsby", ["self_attn.o_proj", "mlp.down_proj"]),
        ("llama", "pfeiffer", ["mlp.down_proj"]),
        ("gpt2", "houlsby", ["attn.c_proj", "mlp.c_proj"]),
        ("gpt2", "pfeiffer", ["mlp.c_proj"]),
    ],
)
def test_placement_picks_the_sublayer_outputs(model_name, placement, expected, request):
    base = request.getfixturevalue(model_name)
    model = get_adapter_model(base, BottleneckConfig(placement=placement, bottleneck_size=4))
    assert model.peft_config["default"].target_modules == expected
    wrapped = sorted(n for n, m in model.get_base_model().named_modules() if isinstance(m, BottleneckLayer))
    layers = 2
    assert len(wrapped) == layers * len(expected)
    assert all(any(n.endswith(e) for e in expected) for n in wrapped)


def test_houlsby_forward_in_a_llama_block_matches_hand_computation(llama_base):
    """Block output = residual + adapter(attention), then residual + adapter(MLP), by hand."""
    torch.manual_seed(0)
    model = get_adapter_model(copy.deepcopy(llama_base), BottleneckConfig(bottleneck_size=4, init_weights=False))
    model.eval()
    block = model.get_base_model().model.layers[0]
    base_block = llama_base.model.layers[0]
    x = torch.randn(2, 5, 32)
    captured = {}
    handle = base_block.self_attn.register_forward_hook(lambda m, i, o: captured.setdefault("attn", o[0]))
    handle2 = base_block.mlp.register_forward_hook(lambda m, i, o: captured.setdefault("mlp_in", i[0]))
    positions = torch.arange(5)[None]
    rotary = llama_base.model.rotary_emb(x, positions)
    with torch.no_grad():
        base_block(x, position_embeddings=rotary)
        ours = block(x, position_embeddings=rotary)
    handle.remove()
    handle2.remove()
    o_proj, down_proj = block.self_attn.o_proj, block.mlp.down_proj
    with torch.no_grad():
        hidden = x + _bottleneck(captured["attn"], o_proj, "default", torch.relu)
        mlp = base_block.mlp
        normed = base_block.post_attention_layernorm(hidden)
        inner = mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed)
        expected = hidden + _bottleneck(mlp.down_proj(inner), down_proj, "default", torch.relu)
    ours = ours[0] if isinstance(ours, tuple) else ours
    assert torch.allclose(ours, expected, atol=1e-5)


def test_fresh_adapter_leaves_the_model_unchanged(llama, input_ids, fwd):
    expected = fwd(llama, input_ids)
    model = get_adapter_model(llama, BottleneckConfig())
    assert torch.equal(fwd(model, input_ids), expected)
    trainable, _ = model.get_nb_trainable_parameters()
    # 2 layers x (o_proj + down_proj) x (down 32->2 + bias, up 2->32 + bias); 32 // 16 = 2
    assert trainable == 2 * 2 * (32 * 2 + 2 + 2 * 32 + 32)


# ---------------------------------------------------------------------- merging
def test_merge_is_refused_with_a_clear_error_and_unload_restores_the_base(llama_base, input_ids, fwd):
    model = get_adapter_model(copy.deepcopy(llama_base), BottleneckConfig(bottleneck_size=4, init_weights=False))
    model.eval()
    adapted = fwd(model, input_ids)
    with pytest.raises(ValueError, match="BottleneckConfig adapter 'default' cannot be merged.*unload"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    layer = model.get_base_model().model.layers[0].mlp.down_proj
    with pytest.raises(ValueError, match="cannot be merged into the base weights"):
        layer.merge()
    with pytest.raises(ValueError, match="has no weight delta"):
        layer.get_delta_weight("default")
    assert torch.equal(fwd(model, input_ids), adapted)  # nothing was changed by the refusals
    with model.disable_adapter():
        assert torch.equal(fwd(model, input_ids), fwd(llama_base, input_ids))
    plain = model.unload()
    assert not any(isinstance(m, BottleneckLayer) for m in plain.modules())
    assert torch.equal(fwd(plain, input_ids), fwd(llama_base, input_ids))


# ---------------------------------------------------------------------- files
@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_save_load_round_trip(model_name, request, input_ids, fwd, tmp_path):
    base = request.getfixturevalue(f"{model_name}_base")
    torch.manual_seed(2)
    config = BottleneckConfig(reduction_factor=8, non_linearity="silu", placement="pfeiffer", init_weights=False)
    model = get_adapter_model(copy.deepcopy(base), config).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK" and saved["placement"] == "pfeiffer"
    assert saved["non_linearity"] == "silu" and saved["reduction_factor"] == 8
    keys = set(model.adapter_state_dict())
    suffix = "mlp.down_proj" if model_name == "llama" else "mlp.c_proj"
    assert keys and all(k.startswith("base_model.model.") for k in keys)
    assert all(f"{suffix}.adapter_" in k and k.rsplit(".", 1)[-1] in ("weight", "bias") for k in keys)
    assert isinstance(load_config(tmp_path), BottleneckConfig)
    loaded = AdapterModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert torch.equal(fwd(loaded, input_ids), fwd(model, input_ids))
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = AdapterModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]


def test_loading_into_a_different_base_fails_naming_the_key(llama_base, tmp_path):
    import transformers

    get_adapter_model(copy.deepcopy(llama_base), BottleneckConfig(bottleneck_size=4)).save_pretrained(tmp_path)
    config = copy.deepcopy(llama_base.config)
    config.hidden_size = 48
    torch.manual_seed(0)
    wider = _quiet(transformers.LlamaForCausalLM, config)
    with pytest.raises(ValueError, match=r"different base\? .*adapter_(down|up)"):
        AdapterModel.from_pretrained(wider, tmp_path)


# ---------------------------------------------------------------------- config
def test_config_errors():
    with pytest.raises(ValueError, match="bottleneck_size or reduction_factor, not both"):
        BottleneckConfig(bottleneck_size=4, reduction_factor=2)
    with pytest.raises(ValueError, match="bottleneck_size must be a positive integer"):
        BottleneckConfig(bottleneck_size=0)
    with pytest.raises(ValueError, match="placement must be one of"):
        BottleneckConfig(placement="parallel")
    with pytest.raises(ValueError, match="non_linearity must be one of"):
        BottleneckConfig(non_linearity="tanh")
    with pytest.raises(ValueError, match=r"adapter_dropout must be in \[0, 1\)"):
        BottleneckConfig(adapter_dropout=1.0)
    with pytest.raises(ValueError, match="no default for model_type"):
        get_adapter_model(nn.Sequential(nn.Linear(4, 4)), BottleneckConfig())
    with pytest.raises(TypeError, match="wrap Linear or Conv1D"):
        BottleneckConfig(target_modules=["0"]).create_layer(nn.Embedding(4, 4), "a", "0")
    wrapped = get_adapter_model(nn.Sequential(nn.Linear(4, 4)), BottleneckConfig(target_modules=["0"]))
    assert isinstance(wrapped.get_base_model()[0], BottleneckLayer)


# ---------------------------------------------------------------------- training
def test_training_lowers_the_loss(llama):
    torch.manual_seed(0)
    model = get_adapter_model(llama, BottleneckConfig(bottleneck_size=8))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dim() in (1, 2) for p in trainable)
    batch = torch.randint(1, 100, (4, 12), generator=torch.Generator().manual_seed(5))
    optimizer = torch.optim.Adam(trainable, lr=0.01)
    losses = []
    for _ in range(15):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
