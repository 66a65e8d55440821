"""add_weighted_adapter: every combination type against hand-computed deltas and against peft."""

from __future__ import annotations

import copy
import math
import os
import warnings

import pytest
import torch

from raypeft.adapters import AdapterModel, IA3Config, LoraConfig, get_adapter_model
from raypeft.adapters.combine import combined_delta
from raypeft.adapters.injection import adapter_layers

peft = pytest.importorskip("peft")

ALL_TYPES = ["linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
             "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _two_adapters(base, targets_b=("q_proj", "v_proj"), r_b: int = 4, **extra):
    torch.manual_seed(0)
    model = _quiet(get_adapter_model, copy.deepcopy(base),
                   LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **extra))
    _quiet(model.add_adapter, "b", LoraConfig(r=r_b, lora_alpha=4, target_modules=list(targets_b),
                                              init_lora_weights=False, **extra))
    return model


def _deltas(model, name):
    return {n: combined_delta(layer, name) for n, layer in adapter_layers(model.get_base_model())
            if name in layer.adapter_names}


def _factors(layer, name):
    return layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach(), layer.scaling[name]


def _ties_reference(tensors, weights, density, method):
    """TIES by the paper, entry by entry: trim to the top-``density`` magnitudes, elect a sign, disjoint mean."""
    trimmed = []
    for t in tensors:
        flat = t.flatten()
        keep = int(density * flat.numel())
        threshold = flat.abs().sort(descending=True).values[keep - 1] if keep else math.inf
        trimmed.append(torch.where(t.abs() >= threshold, t, torch.zeros_like(t)))
    out = torch.zeros_like(tensors[0])
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in out.shape]):
        idx = tuple(idx.tolist())
        values = [t[idx].item() for t in trimmed]
        total = sum(values) if method == "total" else sum(math.copysign(1, v) if v else 0 for v in values)
        elected = 1.0 if total >= 0 else -1.0
        agreeing = [w * v for w, v in zip(weights, values) if v != 0 and math.copysign(1, v) == elected]
        out[idx] = sum(agreeing) / max(len(agreeing), 1)
    return out


# ---------------------------------------------------------------------- hand-computed deltas
def test_cat_is_exactly_the_weighted_sum(llama_base):
    model = _two_adapters(llama_base, targets_b=("v_proj",), r_b=2)
    model.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type="cat")
    assert model.peft_config["mix"].r == 6 and model.peft_config["mix"].lora_alpha == 6
    for name, layer in adapter_layers(model.get_base_model()):
        a0, b0, s0 = _factors(layer, "default")
        expected = 0.7 * s0 * b0 @ a0
        if "b" in layer.adapter_names:
            a1, b1, s1 = _factors(layer, "b")
            expected = expected - 0.4 * s1 * b1 @ a1
        assert torch.allclose(combined_delta(layer, "mix"), expected, atol=1e-6), name
        assert layer.scaling["mix"] == 1.0


def test_linear_combines_the_factors(llama_base):
    model = _two_adapters(llama_base)
    model.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type="linear")
    for _, layer in adapter_layers(model.get_base_model()):
        (a0, b0, s0), (a1, b1, s1) = _factors(layer, "default"), _factors(layer, "b")
        c0, c1 = 0.7 * s0, -0.4 * s1
        a = math.sqrt(abs(c0)) * a0 - math.sqrt(abs(c1)) * a1  # the sign goes on A only
        b = math.sqrt(abs(c0)) * b0 + math.sqrt(abs(c1)) * b1
        assert torch.allclose(combined_delta(layer, "mix"), b @ a, atol=1e-6)


def test_svd_truncates_the_weighted_sum(llama_base):
    model = _two_adapters(llama_base)
    model.add_weighted_adapter(["default", "b"], [1.0, 0.5], "full", combination_type="svd", svd_rank=8)
    model.add_weighted_adapter(["default", "b"], [1.0, 0.5], "low", combination_type="svd", svd_rank=2)
    for _, layer in adapter_layers(model.get_base_model()):
        (a0, b0, s0), (a1, b1, s1) = _factors(layer, "default"), _factors(layer, "b")
        target = s0 * b0 @ a0 + 0.5 * s1 * b1 @ a1
        assert torch.allclose(combined_delta(layer, "full"), target, atol=1e-5)  # rank 8 holds it exactly
        u, s, vh = torch.linalg.svd(target)
        best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]  # Eckart-Young: the best rank-2 approximation
        assert torch.allclose(combined_delta(layer, "low"), best, atol=1e-5)
        assert torch.linalg.matrix_rank(combined_delta(layer, "low")) == 2


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_svd_matches_the_paper_entry_by_entry(method):
    torch.manual_seed(1)
    base = torch.nn.Sequential(torch.nn.Linear(5, 4))
    model = get_adapter_model(base, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False))
    model.add_adapter("c", LoraConfig(r=2, lora_alpha=1, target_modules=["0"], init_lora_weights=False))
    model.add_weighted_adapter(["default", "b", "c"], [1.0, 0.6, -0.8], "mix", combination_type="ties_svd",
                               density=0.5, majority_sign_method=method, svd_rank=4)
    layer = model.get_base_model()[0]
    tensors = [combined_delta(layer, n) for n in ("default", "b", "c")]
    expected = _ties_reference(tensors, [1.0, 0.6, -0.8], 0.5, method)
    assert torch.allclose(combined_delta(layer, "mix"), expected, atol=1e-5)


def test_magnitude_prune_svd_keeps_the_largest_entries():
    torch.manual_seed(2)
    model = get_adapter_model(torch.nn.Sequential(torch.nn.Linear(6, 4)),
                              LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    model.add_weighted_adapter(["default", "b"], [0.5, 2.0], "mix", combination_type="magnitude_prune_svd",
                               density=0.25, svd_rank=4)
    layer = model.get_base_model()[0]
    expected = torch.zeros(4, 6)
    for name, w in (("default", 0.5), ("b", 2.0)):
        d = combined_delta(layer, name)
        keep = d.abs().flatten().topk(6).indices  # 25% of 24 entries
        pruned = torch.zeros(24)
        pruned[keep] = d.flatten()[keep]
        expected += w * pruned.view(4, 6)
    assert torch.allclose(combined_delta(layer, "mix"), expected, atol=1e-5)


def test_dare_at_full_density_is_linear_and_random_otherwise(llama_base):
    model = _two_adapters(llama_base)
    model.add_weighted_adapter(["default", "b"], [0.7, 0.3], "lin", combination_type="linear")
    model.add_weighted_adapter(["default", "b"], [0.7, 0.3], "dare1", combination_type="dare_linear", density=1.0)
    torch.manual_seed(9)
    model.add_weighted_adapter(["default", "b"], [0.7, 0.3], "dare_a", combination_type="dare_linear", density=0.5)
    torch.manual_seed(9)
    model.add_weighted_adapter(["default", "b"], [0.7, 0.3], "dare_b", combination_type="dare_linear", density=0.5)
    lin, dare1, dare_a, dare_b = (_deltas(model, n) for n in ("lin", "dare1", "dare_a", "dare_b"))
    for key in lin:
        assert torch.allclose(dare1[key], lin[key], atol=1e-6)
        assert torch.equal(dare_a[key], dare_b[key])  # reproducible under a seed
        assert (dare_a[key] - lin[key]).abs().max() > 1e-3
    # each source entry is dropped or rescaled by 1 / density: where both were dropped, A is zero
    assert (model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["dare_a"].weight == 0).any()


# ---------------------------------------------------------------------- against peft
def _peft_twin(model, base, names, tmp_path):
    model.save_pretrained(tmp_path, selected_adapters=names)
    twin = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), str(tmp_path), adapter_name=names[0])
    for name in names[1:]:
        _quiet(twin.load_adapter, os.path.join(tmp_path, name), name)
    return twin


def _peft_deltas(twin, name):
    out = {}
    for n, module in twin.base_model.model.named_modules():
        if hasattr(module, "lora_A") and name in module.lora_A:
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
        elif hasattr(module, "lora_embedding_A") and name in module.lora_embedding_A:
            a, b = module.lora_embedding_A[name], module.lora_embedding_B[name]
        else:
            continue
        out[n] = (b @ a * module.scaling[name]).detach()
    return out


@pytest.mark.parametrize("combination_type", ALL_TYPES)
def test_matches_peft_add_weighted_adapter(combination_type, llama_base, tmp_path):
    model = _two_adapters(llama_base)
    twin = _peft_twin(model, llama_base, ["default", "b"], tmp_path)
    kw = {} if combination_type in ("linear", "cat", "svd") else {"density": 0.5}
    torch.manual_seed(7)  # DARE draws: the same draws in the same order as peft
    model.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mix", combination_type=combination_type, **kw)
    torch.manual_seed(7)
    _quiet(twin.add_weighted_adapter, ["default", "b"], [0.7, -0.4], "mix", combination_type=combination_type, **kw)
    ours, theirs = _deltas(model, "mix"), _peft_deltas(twin, "mix")
    assert set(ours) == set(theirs) and ours
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-5), key
    assert model.peft_config["mix"].r == twin.peft_config["mix"].r


@pytest.mark.parametrize("combination_type", ["cat", "svd", "linear"])
def test_matches_peft_on_conv1d_and_embedding(combination_type, gpt2_base, tmp_path):
    torch.manual_seed(0)
    targets = ["c_attn", "wte"]
    model = _quiet(get_adapter_model, copy.deepcopy(gpt2_base),
                   LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    _quiet(model.add_adapter, "b", LoraConfig(r=2, lora_alpha=6, target_modules=targets, init_lora_weights=False))
    twin = _peft_twin(model, gpt2_base, ["default", "b"], tmp_path)
    _quiet(model.add_weighted_adapter, ["default", "b"], [0.5, 1.5], "mix", combination_type=combination_type)
    _quiet(twin.add_weighted_adapter, ["default", "b"], [0.5, 1.5], "mix", combination_type=combination_type)
    ours, theirs = _deltas(model, "mix"), _peft_deltas(twin, "mix")
    assert set(ours) == set(theirs) and any(k.endswith("wte") for k in ours)
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], atol=1e-5), key


def test_combined_adapter_forward_saves_and_loads_in_peft(llama_base, input_ids, fwd, tmp_path):
    model = _two_adapters(llama_base, targets_b=("v_proj", "o_proj"), r_b=2)
    model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="cat")
    assert set(model.peft_config["mix"].target_modules) == {
        f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj", "o_proj")}
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix." in n)  # added inactive
    model.set_adapter("mix")
    combined = fwd(model, input_ids)
    # the same as both adapters folded into the base weights
    manual = copy.deepcopy(llama_base)
    for name, layer in adapter_layers(model.get_base_model()):
        weight = manual.get_submodule(name).weight
        with torch.no_grad():
            for adapter in ("default", "b"):
                if adapter in layer.adapter_names:
                    weight.add_(combined_delta(layer, adapter))
    assert (combined - fwd(manual, input_ids)).abs().max() <= 1e-5
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(llama_base), str(tmp_path / "mix")).eval()
    assert (fwd(theirs, input_ids) - combined).abs().max() <= 1e-5
    loaded = AdapterModel.from_pretrained(copy.deepcopy(llama_base), tmp_path / "mix")
    assert (fwd(loaded, input_ids) - combined).abs().max() <= 1e-6


# ---------------------------------------------------------------------- errors
def test_errors(llama_base):
    model = _two_adapters(llama_base, r_b=2)
    with pytest.raises(ValueError, match=r"'linear' needs adapters of one rank.*use 'cat' or 'svd'"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "x", combination_type="linear")
    with pytest.raises(ValueError, match="combination_type must be one of"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "x", combination_type="average")
    with pytest.raises(ValueError, match="needs density in"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "x", combination_type="ties_svd")
    with pytest.raises(ValueError, match="weights must have one entry per adapter"):
        model.add_weighted_adapter(["default", "b"], [1], "x", combination_type="cat")
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        model.add_weighted_adapter(["default", "nope"], [1, 1], "x", combination_type="cat")
    with pytest.raises(ValueError, match="'b' already exists"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "b", combination_type="cat")
    with pytest.raises(ValueError, match="majority_sign_method must be one of"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "x", combination_type="ties_svd", density=0.5,
                                   majority_sign_method="mean")
    with pytest.raises(ValueError, match="svd_rank must be a positive integer"):
        model.add_weighted_adapter(["default", "b"], [1, 1], "x", combination_type="svd", svd_rank=0)
    assert "x" not in model.peft_config  # nothing half-built was left behind
    model.add_adapter("ia3", IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="combines LoRA adapters only; 'ia3' is a IA3Config adapter"):
        model.add_weighted_adapter(["default", "ia3"], [1, 1], "x", combination_type="cat")
    model.add_adapter("dora", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="'dora' is a DoRA adapter"):
        model.add_weighted_adapter(["default", "dora"], [1, 1], "x", combination_type="cat")
    saved = _quiet(get_adapter_model, copy.deepcopy(llama_base),
                   LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    saved.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match=r"all train a copy of 'lm_head'"):
        saved.add_weighted_adapter(["default", "b"], [1, 1], "x", combination_type="cat")
