"""The fused LoRA linear path computes exactly what the general (module-by-module) path computes.

``LoraLinear`` takes the fused path (one autograd node: base GEMM + ``addmm_`` of the low-rank
update; hand-written backward) for a single active plain-LoRA adapter on a hook-free dense
``nn.Linear``/``Conv1D`` with matching dtypes; these tests force the general path on a twin layer
and compare outputs and every gradient, and check that the fused path steps aside when it must.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from transformers.pytorch_utils import Conv1D

from raypeft.adapters.lora import LoraLinear
from raypeft.adapters.lora.fused import FusedLoraLinear


def _layer(base: nn.Module, dropout: float = 0.0, bias_trains: bool = False) -> LoraLinear:
    base.weight.requires_grad_(False)
    if getattr(base, "bias", None) is not None:
        base.bias.requires_grad_(bias_trains)
    layer = LoraLinear(base)
    layer.add_adapter("a", r=4, scaling=1.5, dropout=dropout, init=False)
    layer.set_adapter("a")
    return layer


def _run(layer: LoraLinear, x: torch.Tensor, fused: bool, seed: int = 0):
    """Output, input grad and parameter grads; ``fused=False`` hides the fused plan."""
    plan = layer._fused_plan
    if not fused:
        layer._fused_plan = None
    try:
        torch.manual_seed(seed)
        xx = x.clone().requires_grad_(True)
        y = layer(xx)
        (y.float() ** 2).sum().backward()
    finally:
        layer._fused_plan = plan
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)
    return y.detach(), xx.grad, grads


def _assert_same(a, b, tol: float) -> None:
    (ya, gxa, ga), (yb, gxb, gb) = a, b
    torch.testing.assert_close(ya, yb, atol=tol, rtol=tol)
    torch.testing.assert_close(gxa, gxb, atol=tol, rtol=tol)
    assert ga.keys() == gb.keys()
    for key in ga:
        torch.testing.assert_close(ga[key], gb[key], atol=tol, rtol=tol)


@pytest.mark.parametrize("kind", ["linear", "linear_no_bias", "conv1d"])
@pytest.mark.parametrize("shape", [(2, 5, 16), (16,), (0, 16)])
@pytest.mark.parametrize("bias_trains", [False, True])
def test_fused_matches_general_path(kind, shape, bias_trains):
    torch.manual_seed(0)
    base = Conv1D(12, 16) if kind == "conv1d" else nn.Linear(16, 12, bias=kind == "linear")
    layer = _layer(base, bias_trains=bias_trains)
    assert layer._fused_plan is not None
    x = torch.randn(*shape)
    general = _run(layer, x, fused=False)
    _assert_same(_run(layer, x, fused=True), general, 1e-5)
    with torch.no_grad():  # the graph-free fused variant (generation, evaluation)
        torch.testing.assert_close(layer(x), general[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_with_trainable_base_weight_matches_general_path(kind):
    base = Conv1D(12, 16) if kind == "conv1d" else nn.Linear(16, 12)
    layer = _layer(base)
    base.weight.requires_grad_(True)  # a fully trained base (no freezing) still gets exact gradients
    x = torch.randn(2, 3, 16)
    fused, general = _run(layer, x, fused=True), _run(layer, x, fused=False)
    assert "base_layer.weight" in fused[2]
    _assert_same(fused, general, 1e-5)


def test_fused_with_dropout_matches_general_path():
    layer = _layer(nn.Linear(16, 12), dropout=0.5).train()
    x = torch.randn(3, 16)
    _assert_same(_run(layer, x, fused=True, seed=3), _run(layer, x, fused=False, seed=3), 1e-5)


def test_fused_bfloat16_matches_general_path():
    torch.manual_seed(0)
    layer = _layer(nn.Linear(32, 24).to(torch.bfloat16))
    layer.to(torch.bfloat16)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    _assert_same(_run(layer, x, fused=True), _run(layer, x, fused=False), 3e-2)


def test_fused_path_is_used_and_steps_aside(monkeypatch):
    calls: list[int] = []
    real = FusedLoraLinear.apply
    monkeypatch.setattr(FusedLoraLinear, "apply", lambda *a: (calls.append(1), real(*a))[1])
    layer = _layer(nn.Linear(8, 8))
    x = torch.randn(2, 8, requires_grad=True)
    layer(x)
    assert calls == [1]
    # a forward hook on the base (ZeRO-3 gathers weights in such hooks) must see the base called
    seen: list[int] = []
    handle = layer.base_layer.register_forward_pre_hook(lambda m, a: seen.append(1))
    layer(x)
    handle.remove()
    assert seen == [1] and calls == [1]
    # a replaced base layer is never bypassed with the stale one
    twin = copy.deepcopy(layer)
    new_base = nn.Linear(8, 8)
    new_base.requires_grad_(False)
    twin.base_layer = new_base
    expected = new_base(x) + 1.5 * twin.lora_B["a"](twin.lora_A["a"](x))
    torch.testing.assert_close(twin(x), expected)
    # two active adapters, or autocast, take the general path
    layer.add_adapter("b", r=2, scaling=1.0, dropout=0.0, init=False)
    layer.set_adapter(["a", "b"])
    assert layer._fused_plan is None
    layer.set_adapter("a")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert calls == [1]
