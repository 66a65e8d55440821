"""LoHa and LoKr: forward against hand-written formulas, factor shapes, merging, PEFT interop, training."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from raypeft.adapters import AdapterModel, LoHaConfig, LoHaLayer, LoKrConfig, LoKrLayer, get_adapter_model, load_config
from raypeft.adapters.lokr import factorization

peft = pytest.importorskip("peft")

TOL = 1e-5


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _wrap(config, base: nn.Module):
    layer = config.create_layer(base, "default", "block.proj")
    layer.set_adapter("default")
    return layer


def _kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product written out block by block: block (i, j) is ``a[i, j] * b``."""
    rows = [torch.cat([a[i, j] * b for j in range(a.shape[1])], dim=1) for i in range(a.shape[0])]
    return torch.cat(rows, dim=0)


# ---------------------------------------------------------------------- LoHa math
def test_loha_linear_matches_formula():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = _wrap(LoHaConfig(r=3, alpha=6, init_weights=False), base)
    w1a, w1b = layer.hada_w1_a["default"], layer.hada_w1_b["default"]
    w2a, w2b = layer.hada_w2_a["default"], layer.hada_w2_b["default"]
    assert (w1a.shape, w1b.shape, w2a.shape, w2b.shape) == ((10, 3), (3, 12), (10, 3), (3, 12))
    delta = torch.zeros(10, 12)
    for i in range(10):
        for j in range(12):
            delta[i, j] = (w1a[i] @ w1b[:, j]) * (w2a[i] @ w2b[:, j]) * (6 / 3)
    x = torch.randn(2, 4, 12)
    expected = x @ (base.weight + delta).T + base.bias
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.allclose(layer.get_delta_weight("default"), delta, atol=1e-6)
    assert (layer(x) - base(x)).abs().max() > 1e-3


def test_loha_conv1d_delta_is_transposed():
    torch.manual_seed(0)
    base = Conv1D(10, 12)  # out=10, in=12, weight (12, 10)
    layer = _wrap(LoHaConfig(r=2, alpha=2, init_weights=False), base)
    delta_oi = (layer.hada_w1_a["default"] @ layer.hada_w1_b["default"]) * (
        layer.hada_w2_a["default"] @ layer.hada_w2_b["default"]
    )
    x = torch.randn(3, 12)
    assert torch.allclose(layer(x), x @ (base.weight + delta_oi.T) + base.bias, atol=1e-5)
    assert layer.get_delta_weight("default").shape == base.weight.shape


# ---------------------------------------------------------------------- LoKr math
def test_factorization_examples_and_peft_agreement():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    assert factorization(256) == (16, 16)
    assert factorization(128) == (8, 16)
    assert factorization(127) == (1, 127)
    assert factorization(128, 4) == (4, 32)
    assert factorization(36) == (6, 6)
    for dim in range(1, 200):
        for factor in (-1, 1, 2, 3, 4, 6, 8, 16, 1000):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize(
    "kwargs, names",
    [
        (dict(r=4), {"lokr_w1", "lokr_w2"}),  # 32 = 4 x 8: r >= 8 / 2, full w2
        (dict(r=2), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),  # r < 4: low-rank w2
        (dict(r=1, decompose_both=True), {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
        (dict(r=2, decompose_factor=2), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    ],
)
def test_lokr_linear_matches_formula(kwargs, names):
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    layer = _wrap(LoKrConfig(alpha=3, init_weights=False, **kwargs), base)
    held = {k.split(".")[0] for k in layer.adapter_tensors("default")}
    assert held == names
    t = layer.adapter_tensors("default")
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    factor = kwargs.get("decompose_factor", -1)
    assert w1.shape == (factorization(24, factor)[0], factorization(32, factor)[0])
    delta = _kron(w1, w2) * (3 / kwargs["r"])
    assert delta.shape == (24, 32)
    x = torch.randn(5, 32)
    assert torch.allclose(layer(x), x @ (base.weight + delta).T + base.bias, atol=1e-5)
    assert (layer(x) - base(x)).abs().max() > 1e-3


@pytest.mark.parametrize("init", [True, "lycoris"])
def test_initialised_adapters_change_nothing(init):
    torch.manual_seed(0)
    x = torch.randn(3, 32)
    for config in (LoHaConfig(r=4), LoKrConfig(r=2, decompose_both=True, init_weights=init)):
        base = nn.Linear(32, 32)
        layer = _wrap(config, base)
        assert torch.equal(layer(x), base(x))


def test_dropouts_only_in_training():
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    for config in (
        LoHaConfig(r=4, init_weights=False, rank_dropout=0.5, module_dropout=0.5),
        LoKrConfig(r=4, init_weights=False, rank_dropout=0.5, module_dropout=0.5, rank_dropout_scale=True),
    ):
        layer = _wrap(config, copy.deepcopy(base))
        x = torch.randn(4, 16)
        layer.eval()
        first = layer(x)
        assert torch.equal(first, layer(x))  # eval: deterministic, the full update
        layer.train()
        outputs = [layer(x) for _ in range(8)]
        assert any(not torch.allclose(o, first) for o in outputs)
        # module dropout skips the whole adapter: some forwards give exactly the base output
        assert any(torch.allclose(o, base(x)) for o in outputs)


# ---------------------------------------------------------------------- merging
CONFIGS = {
    "loha": lambda: LoHaConfig(r=4, alpha=8, init_weights=False, target_modules=["q_proj", "down_proj"]),
    "lokr": lambda: LoKrConfig(r=2, alpha=4, init_weights=False, target_modules=["q_proj", "down_proj"]),
    "lokr_both": lambda: LoKrConfig(r=1, alpha=1, init_weights=False, decompose_both=True, target_modules="all-linear"),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_merge_unmerge_equivalence(kind, llama_base, input_ids, fwd):
    torch.manual_seed(2)
    model = get_adapter_model(copy.deepcopy(llama_base), CONFIGS[kind]()).eval()
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
    adapted = fwd(model, input_ids)
    assert (adapted - fwd(llama_base, input_ids)).abs().max() > 1e-3
    model.merge_adapter()
    assert (fwd(model, input_ids) - adapted).abs().max() <= TOL
    model.unmerge_adapter()
    after = model.get_base_model().state_dict()
    assert max((after[k] - v).abs().max().item() for k, v in before.items()) <= 1e-6
    with model.disable_adapter():
        assert (fwd(model, input_ids) - fwd(llama_base, input_ids)).abs().max() <= TOL
    merged = model.merge_and_unload()
    assert not any(isinstance(m, (LoHaLayer, LoKrLayer)) for m in merged.modules())
    assert (fwd(merged, input_ids) - adapted).abs().max() <= TOL


def test_two_adapters_and_delete(llama, input_ids, fwd):
    torch.manual_seed(0)
    model = get_adapter_model(llama, LoHaConfig(r=2, init_weights=False, target_modules=["q_proj"]))
    model.add_adapter("other", LoHaConfig(r=3, init_weights=False, target_modules=["q_proj", "v_proj"]))
    first = fwd(model, input_ids)
    model.set_adapter("other")
    second = fwd(model, input_ids)
    assert (first - second).abs().max() > 1e-3
    model.delete_adapter("other")
    assert not isinstance(model.get_base_model().model.layers[0].self_attn.v_proj, LoHaLayer)
    assert (fwd(model, input_ids) - first).abs().max() <= TOL


def test_config_errors():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoHaConfig(r=0)
    with pytest.raises(ValueError, match="rank_dropout must be in"):
        LoKrConfig(rank_dropout=1.5)
    with pytest.raises(ValueError, match="decompose_factor"):
        LoKrConfig(decompose_factor=0)
    with pytest.raises(ValueError, match="init_weights"):
        LoHaConfig(init_weights="lycoris")
    with pytest.raises(TypeError, match="LoKr cannot wrap"):
        LoKrConfig().create_layer(nn.Embedding(4, 4), "default", "emb")


# ---------------------------------------------------------------------- PEFT interop
CASES = {
    "loha_list": (LoHaConfig, peft.LoHaConfig, dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "loha_all_linear_patterns": (
        LoHaConfig,
        peft.LoHaConfig,
        dict(r=3, alpha=5, target_modules="all-linear", rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 16}),
    ),
    "loha_layers_modules_to_save": (
        LoHaConfig,
        peft.LoHaConfig,
        dict(r=2, target_modules=["up_proj"], layers_to_transform=[1], layers_pattern="layers", modules_to_save=["lm_head"]),
    ),
    "lokr_default": (LoKrConfig, peft.LoKrConfig, dict(r=4, alpha=2, target_modules=["q_proj", "down_proj", "gate_proj"])),
    "lokr_decompose_both": (
        LoKrConfig,
        peft.LoKrConfig,
        dict(r=1, decompose_both=True, target_modules=r".*\.(k_proj|up_proj)", rank_pattern={"up_proj": 3}),
    ),
    "lokr_factor": (LoKrConfig, peft.LoKrConfig, dict(r=2, decompose_factor=4, target_modules=["o_proj", "down_proj"])),
}


def _perturb_saved_modules(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_raypeft_to_peft(case, llama_base, input_ids, fwd, tmp_path):
    ours_cls, _, kwargs = CASES[case]
    torch.manual_seed(1)
    ours = get_adapter_model(copy.deepcopy(llama_base), ours_cls(init_weights=False, **kwargs))
    _perturb_saved_modules(ours)
    ours.eval().save_pretrained(tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(llama_base), str(tmp_path)).eval()
    ours_out = fwd(ours, input_ids)
    assert (ours_out - fwd(llama_base, input_ids)).abs().max() > 1e-3
    assert (ours_out - fwd(theirs, input_ids)).abs().max() <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_to_raypeft(case, llama_base, input_ids, fwd, tmp_path):
    _, peft_cls, kwargs = CASES[case]
    torch.manual_seed(1)
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(llama_base), peft_cls(init_weights=False, **kwargs))
    _perturb_saved_modules(theirs)
    theirs.eval()
    _quiet(theirs.save_pretrained, str(tmp_path))
    ours = AdapterModel.from_pretrained(copy.deepcopy(llama_base), tmp_path).eval()
    theirs_out = fwd(theirs, input_ids)
    assert (theirs_out - fwd(llama_base, input_ids)).abs().max() > 1e-3
    assert (fwd(ours, input_ids) - theirs_out).abs().max() <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_keys_match_peft(case, llama_base, tmp_path):
    ours_cls, peft_cls, kwargs = CASES[case]
    ours = get_adapter_model(copy.deepcopy(llama_base), ours_cls(**kwargs))
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(llama_base), peft_cls(**kwargs))
    peft_sd = _quiet(peft.get_peft_model_state_dict, theirs)
    ours_sd = ours.adapter_state_dict()
    assert set(ours_sd) == set(peft_sd)
    assert all(ours_sd[k].shape == peft_sd[k].shape for k in ours_sd)
    ours.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == ours_cls.PEFT_TYPE
    assert type(load_config(tmp_path)) is ours_cls


# ---------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_training_lowers_the_loss(kind, llama):
    torch.manual_seed(0)
    config = (
        LoHaConfig(r=4, target_modules="all-linear")
        if kind == "loha"
        else LoKrConfig(r=4, target_modules="all-linear", init_weights="lycoris")
    )
    model = get_adapter_model(llama, config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    batch = torch.randint(1, 100, (4, 12), generator=torch.Generator().manual_seed(5))
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("config", [LoHaConfig(r=2, init_weights=False), LoKrConfig(r=2, init_weights=False)])
def test_quantized_base_adds_the_update_and_refuses_merge(config):
    pytest.importorskip("bitsandbytes")
    from raypeft.adapters.quantization import quantize_linear_layers

    torch.manual_seed(0)
    base = quantize_linear_layers(nn.Sequential(nn.Linear(64, 64)), 4)[0]
    layer = _wrap(config, base)
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = base(x) + x @ layer.get_delta_weight("default").T
        assert torch.allclose(layer(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="quantized"):
        layer.merge()
    assert not layer.merged_adapters
