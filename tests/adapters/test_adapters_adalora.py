"""AdaLoRA: SVD-form forward, merging, orthogonal regulariser, the rank budget schedule and allocator
(against PEFT step by step), PEFT interop both ways (before and after rank allocation), training."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from raypeft.adapters import (
    AdaLoraConfig,
    AdaLoraLayer,
    AdapterModel,
    get_adapter_model,
    load_config,
    orthogonal_regularization,
    update_and_allocate,
)
from raypeft.adapters.adalora import get_rank_allocator

peft = pytest.importorskip("peft")

TOL = 1e-5


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _config(**kwargs) -> AdaLoraConfig:
    base = dict(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"])
    base.update(kwargs)
    return AdaLoraConfig(**base)


def _batch(seed: int = 5) -> torch.Tensor:
    return torch.randint(1, 100, (4, 10), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- math
@pytest.mark.parametrize("conv1d", [False, True])
def test_forward_matches_formula(conv1d):
    torch.manual_seed(0)
    base = Conv1D(10, 12) if conv1d else nn.Linear(12, 10)
    config = AdaLoraConfig(init_r=3, lora_alpha=6, total_step=5, target_modules=["m"], init_lora_weights=False)
    layer = config.create_layer(base, "default", "m")
    layer.set_adapter("default")
    q, e, p = layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
    assert (q.shape, e.shape, p.shape) == ((3, 12), (3, 1), (10, 3))
    delta = sum(e[i, 0] * torch.outer(p[:, i], q[i]) for i in range(3)) * 6 / (3 + 1e-5)
    weight_oi = base.weight.T if conv1d else base.weight
    x = torch.randn(2, 5, 12)
    expected = x @ (weight_oi + delta).T + base.bias
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.allclose(layer.get_delta_weight("default"), delta.T if conv1d else delta, atol=1e-6)
    assert (layer(x) - base(x)).abs().max() > 1e-3


def test_fresh_adapter_changes_nothing(llama, input_ids, fwd):
    base_out = fwd(llama, input_ids)
    model = get_adapter_model(llama, _config())
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(layer, AdaLoraLayer) and layer.r["default"] == 4 and layer.ranknum["default"] == 4.0
    assert torch.equal(layer.lora_E["default"], torch.zeros(4, 1))
    assert (fwd(model, input_ids) - base_out).abs().max() == 0


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_merge_unmerge_equivalence(model_name, request, input_ids, fwd):
    base = request.getfixturevalue(f"{model_name}_base")
    torch.manual_seed(2)
    model = get_adapter_model(copy.deepcopy(base), AdaLoraConfig(total_step=10, init_lora_weights=False)).eval()
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "base_layer" in k}
    adapted = fwd(model, input_ids)
    assert (adapted - fwd(base, input_ids)).abs().max() > 1e-3
    model.merge_adapter()
    assert (fwd(model, input_ids) - adapted).abs().max() <= TOL
    model.unmerge_adapter()
    after = model.get_base_model().state_dict()
    assert max((after[k] - v).abs().max().item() for k, v in before.items()) <= 1e-5
    merged = model.merge_and_unload()
    assert not any(isinstance(m, AdaLoraLayer) for m in merged.modules())
    assert (fwd(merged, input_ids) - adapted).abs().max() <= TOL


def test_orthogonal_regularization_formula(llama):
    torch.manual_seed(0)
    model = get_adapter_model(llama, _config(orth_reg_weight=0.3, init_lora_weights=False))
    terms = []
    for module in model.modules():
        if isinstance(module, AdaLoraLayer):
            q, p = module.lora_A["default"], module.lora_B["default"]
            terms.append(((q @ q.T - torch.eye(4)) ** 2).sum().sqrt())
            terms.append(((p.T @ p - torch.eye(4)) ** 2).sum().sqrt())
    assert len(terms) == 8  # 2 layers x (q_proj, v_proj) x (P, Q)
    reg = orthogonal_regularization(model)
    assert torch.allclose(reg, 0.3 * torch.stack(terms).mean())
    reg.backward()
    assert model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].grad is not None


def test_orthogonal_regularization_equals_peft_loss_term(llama_base, tmp_path):
    """PEFT adds the regulariser to the loss inside forward; ours is the same number."""
    torch.manual_seed(0)
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(llama_base), peft.AdaLoraConfig(
        init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        task_type="CAUSAL_LM"))  # PEFT adds the regulariser in the task model's forward
    _quiet(theirs.save_pretrained, str(tmp_path))
    ours = AdapterModel.from_pretrained(copy.deepcopy(llama_base), tmp_path, is_trainable=True)
    batch = _batch()
    with torch.no_grad():
        peft_loss = theirs(input_ids=batch, labels=batch).loss
        plain = theirs.base_model.model(input_ids=batch, labels=batch).loss
        ours_loss = ours(input_ids=batch, labels=batch).loss + orthogonal_regularization(ours)
    assert abs((peft_loss - plain).item()) > 1e-3
    assert abs((ours_loss - peft_loss).item()) <= 1e-5


# ---------------------------------------------------------------------- budget schedule and allocator
def test_budget_schedule_reaches_target_r_on_schedule(llama):
    torch.manual_seed(0)
    total, tinit, tfinal, delta_t = 20, 3, 4, 2
    config = _config(init_r=6, target_r=2, tinit=tinit, tfinal=tfinal, deltaT=delta_t, total_step=total)
    model = get_adapter_model(llama, config)
    layers = [m for m in model.modules() if isinstance(m, AdaLoraLayer)]
    n = len(layers)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch()
    budgets = []
    for step in range(total + 2):
        loss = model(input_ids=batch, labels=batch).loss + orthogonal_regularization(model)
        loss.backward()
        optimizer.step()
        budgets.append(update_and_allocate(model, step))
        optimizer.zero_grad()
        kept = sum(int(m.rank_mask["default"].sum()) if "default" in m.rank_mask else m.r["default"] for m in layers)
        if tinit < step < total - tfinal and step % delta_t == 0:
            assert kept == budgets[-1]  # masked down to the budget (no ties between random scores)
        if step >= total - tfinal:
            assert kept == 2 * n
            assert sum(int((m.lora_E["default"] != 0).sum()) for m in layers) == 2 * n
    init_bgt, target_bgt = 6 * n, 2 * n
    for step, budget in enumerate(budgets):
        if step <= tinit:
            expected = init_bgt
        elif step > total - tfinal:
            expected = target_bgt
        else:
            frac = 1 - (step - tinit) / (total - tfinal - tinit)
            expected = int((init_bgt - target_bgt) * frac**3 + target_bgt)
        assert budget == expected, step
    assert budgets[total - tfinal] == target_bgt
    pattern = model.peft_config["default"].rank_pattern
    assert set(pattern) == {f"model.layers.{i}.self_attn.{p}.lora_E" for i in range(2) for p in ("q_proj", "v_proj")}
    assert sum(sum(mask) for mask in pattern.values()) == 2 * n


def test_allocator_matches_peft_step_by_step(llama_base, input_ids, fwd, tmp_path):
    """Same start, same data, same optimiser: PEFT's and our rank patterns agree at every step."""
    kwargs = dict(init_r=4, target_r=2, tinit=2, tfinal=2, deltaT=1, total_step=10, target_modules=["q_proj", "v_proj"],
                  task_type="CAUSAL_LM")  # PEFT adds the orthogonal regulariser to the loss in forward
    torch.manual_seed(0)
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(llama_base), peft.AdaLoraConfig(**kwargs))
    with torch.no_grad():  # a non-zero start, so P and Q get gradients from the first step
        for name, param in theirs.named_parameters():
            if "lora_E" in name:
                param.normal_(std=0.5)
    (tmp_path / "start").mkdir()
    _quiet(theirs.save_pretrained, str(tmp_path / "start"))
    ours = AdapterModel.from_pretrained(copy.deepcopy(llama_base), tmp_path / "start", is_trainable=True)
    theirs.train()
    ours.train()
    opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.1)
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    batch = _batch()
    for step in range(12):
        _quiet(lambda: theirs(input_ids=batch, labels=batch).loss.backward())
        opt_theirs.step()
        _quiet(theirs.base_model.update_and_allocate, step)
        opt_theirs.zero_grad()
        (ours(input_ids=batch, labels=batch).loss + orthogonal_regularization(ours)).backward()
        opt_ours.step()
        update_and_allocate(ours, step)
        opt_ours.zero_grad()
        peft_pattern = theirs.peft_config["default"].rank_pattern
        if peft_pattern:
            expected = {k.replace(".default", ""): list(map(bool, v)) for k, v in peft_pattern.items()}
            assert ours.peft_config["default"].rank_pattern == expected, step
    ours.eval()
    theirs.eval()
    assert (fwd(ours, input_ids) - fwd(theirs, input_ids)).abs().max() <= 1e-4


# ---------------------------------------------------------------------- PEFT interop
def _allocate(model, steps: int) -> None:
    """Train with allocation until the final pattern is fixed (the adapter holds fewer triplets)."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(7)
    model.train()
    for step in range(steps):
        (model(input_ids=batch, labels=batch).loss + orthogonal_regularization(model)).backward()
        optimizer.step()
        update_and_allocate(model, step)
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_raypeft_to_peft(model_name, request, input_ids, fwd, tmp_path):
    base = request.getfixturevalue(f"{model_name}_base")
    torch.manual_seed(1)
    ours = get_adapter_model(copy.deepcopy(base), AdaLoraConfig(init_r=4, total_step=10, init_lora_weights=False))
    ours.eval().save_pretrained(tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), str(tmp_path)).eval()
    ours_out = fwd(ours, input_ids)
    assert (ours_out - fwd(base, input_ids)).abs().max() > 1e-3
    assert (ours_out - fwd(theirs, input_ids)).abs().max() <= TOL


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_peft_to_raypeft(model_name, request, input_ids, fwd, tmp_path):
    base = request.getfixturevalue(f"{model_name}_base")
    torch.manual_seed(1)
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(base), peft.AdaLoraConfig(
        init_r=4, total_step=10, init_lora_weights=False, lora_alpha=16))
    theirs.eval()
    _quiet(theirs.save_pretrained, str(tmp_path))
    ours = AdapterModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    theirs_out = fwd(theirs, input_ids)
    assert (theirs_out - fwd(base, input_ids)).abs().max() > 1e-3
    assert (fwd(ours, input_ids) - theirs_out).abs().max() <= TOL


def test_allocated_adapter_round_trips_through_peft(llama_base, input_ids, fwd, tmp_path):
    torch.manual_seed(3)
    ours = get_adapter_model(copy.deepcopy(llama_base), _config(init_r=6, target_r=3, tfinal=2, total_step=8))
    with torch.no_grad():
        for module in ours.modules():
            if isinstance(module, AdaLoraLayer):
                module.lora_E["default"].normal_(std=0.5)
    _allocate(ours, 8)
    ours_out = fwd(ours, input_ids)
    assert (ours_out - fwd(llama_base, input_ids)).abs().max() > 1e-3
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    pattern = saved["rank_pattern"]
    assert pattern and all(k.endswith(".lora_E") and len(v) == 6 for k, v in pattern.items())
    state = ours.adapter_state_dict()
    key = "model.layers.0.self_attn.q_proj"
    rank = sum(pattern[f"{key}.lora_E"])
    assert state[f"base_model.model.{key}.lora_A"].shape == (rank, 32)
    assert state[f"base_model.model.{key}.lora_B"].shape == (32, rank)
    assert sum(t.shape[0] for k, t in state.items() if k.endswith("lora_E")) == 3 * 4

    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(llama_base), str(tmp_path / "ours")).eval()
    assert (fwd(theirs, input_ids) - ours_out).abs().max() <= TOL

    _quiet(theirs.save_pretrained, str(tmp_path / "theirs"))
    back = AdapterModel.from_pretrained(copy.deepcopy(llama_base), tmp_path / "theirs").eval()
    layer = back.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.r["default"] == rank and layer.ranknum["default"] == 6.0
    assert (fwd(back, input_ids) - ours_out).abs().max() <= TOL


def test_peft_allocated_adapter_loads(llama_base, input_ids, fwd, tmp_path):
    torch.manual_seed(4)
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(llama_base), peft.AdaLoraConfig(
        init_r=5, target_r=2, tinit=1, tfinal=2, total_step=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_E" in name:
                param.normal_(std=0.5)
    optimizer = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(9)
    for step in range(8):
        _quiet(lambda: theirs(input_ids=batch, labels=batch).loss.backward())
        optimizer.step()
        _quiet(theirs.base_model.update_and_allocate, step)
        optimizer.zero_grad()
    theirs.eval()
    _quiet(theirs.save_pretrained, str(tmp_path))
    config = load_config(tmp_path)
    assert isinstance(config, AdaLoraConfig) and config.rank_pattern
    ours = AdapterModel.from_pretrained(copy.deepcopy(llama_base), tmp_path).eval()
    assert (fwd(ours, input_ids) - fwd(theirs, input_ids)).abs().max() <= TOL


def test_saved_keys_match_peft(llama_base):
    ours = get_adapter_model(copy.deepcopy(llama_base), _config())
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(llama_base), peft.AdaLoraConfig(
        init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"]))
    peft_sd = _quiet(peft.get_peft_model_state_dict, theirs)
    ours_sd = ours.adapter_state_dict()
    assert set(ours_sd) == set(peft_sd)
    assert all(ours_sd[k].shape == peft_sd[k].shape for k in ours_sd)


# ---------------------------------------------------------------------- config
def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="total_step must be a positive integer"):
        AdaLoraConfig()
    with pytest.raises(ValueError, match="no budgeting phase"):
        AdaLoraConfig(total_step=10, tinit=6, tfinal=4)
    with pytest.raises(ValueError, match="beta1"):
        AdaLoraConfig(total_step=10, beta1=1.0)
    with pytest.raises(ValueError, match="use_dora"):
        AdaLoraConfig.from_dict({"peft_type": "ADALORA", "total_step": 10, "use_dora": True})
    config = AdaLoraConfig.from_dict(
        {"peft_type": "ADALORA", "total_step": 10, "rank_pattern": {"a.q_proj.lora_E.default": [1, 0, 1]}}
    )
    assert config.rank_pattern == {"a.q_proj.lora_E": [True, False, True]}


def test_allocator_refuses_growing_budget_and_frozen_adapters(llama, tmp_path):
    model = get_adapter_model(llama, _config(init_r=2, target_r=4))
    with pytest.raises(ValueError, match="target_r"):
        get_rank_allocator(model)
    model.save_pretrained(tmp_path)
    frozen = AdapterModel.from_pretrained(model.unload(), tmp_path)
    with pytest.raises(ValueError, match="inference mode"):
        update_and_allocate(frozen, 0)


# ---------------------------------------------------------------------- training
def test_training_with_allocation_lowers_the_loss(llama):
    torch.manual_seed(0)
    model = get_adapter_model(llama, _config(init_r=6, target_r=2, tinit=5, tfinal=5, total_step=30,
                                             target_modules="all-linear", lora_alpha=32))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    batch = _batch()
    model.train()
    losses = []
    for step in range(30):
        task = model(input_ids=batch, labels=batch).loss
        (task + orthogonal_regularization(model)).backward()
        optimizer.step()
        update_and_allocate(model, step)
        optimizer.zero_grad()
        losses.append(task.item())
    assert losses[-1] < losses[0] - 0.1
    masks = model.peft_config["default"].rank_pattern
    assert sum(sum(m) for m in masks.values()) == 2 * len(masks)


def test_quantized_base_adds_the_update_and_refuses_merge():
    pytest.importorskip("bitsandbytes")
    from raypeft.adapters.quantization import quantize_linear_layers

    torch.manual_seed(0)
    base = quantize_linear_layers(nn.Sequential(nn.Linear(64, 64)), 4)[0]
    layer = AdaLoraConfig(init_r=3, total_step=5, target_modules=["m"], init_lora_weights=False).create_layer(
        base, "default", "m"
    )
    layer.set_adapter("default")
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = base(x) + x @ layer.get_delta_weight("default").T
        assert torch.allclose(layer(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="quantized"):
        layer.merge()
    assert not layer.merged_adapters
