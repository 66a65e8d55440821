"""LoRA's fused Linear path: base GEMM and one low-rank update as a single autograd node.

Exactly the LoRA formula ``y = x W^T + b + s (x' A^T) B^T`` with fewer kernels and no intermediate
of the output's size. :class:`~adapters.lora.linear.LoraLinear` takes it only when it is exact
(a plain dense base, no module hooks, no autocast, one dtype); see ``LoraLinear._fused_forward``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


# Module hooks anywhere (DeepSpeed ZeRO-3 gathers partitioned weights in forward pre-hooks, profilers
# and debuggers add forward hooks) mean a module must be *called*, not bypassed by the fused path.
GLOBAL_HOOKS = tuple(
    getattr(torch.nn.modules.module, name)
    for name in (
        "_global_forward_pre_hooks",
        "_global_forward_hooks",
        "_global_backward_pre_hooks",
        "_global_backward_hooks",
    )
    if hasattr(torch.nn.modules.module, name)
)
PLAIN_TENSORS = (nn.Parameter, torch.Tensor)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D ``(rows, last dim)`` view (also for 1-D and empty inputs)."""
    return t.view(-1, t.shape[-1]) if t.numel() else t.view(math.prod(t.shape[:-1]), t.shape[-1])


def hook_free(module: nn.Module) -> bool:
    return not (
        module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks or module._backward_hooks
    )


class FusedLoraLinear(torch.autograd.Function):
    """``y = x W^T + b + s (x' A^T) B^T`` as one autograd node, ``x'`` the (dropped-out) LoRA input.

    Exactly the LoRA formula, with fewer kernels and no intermediate of the output's size: forward
    runs the base GEMM, the ``r``-wide ``x' A^T`` and adds ``s h B^T`` into the base output in
    place (``addmm_``); backward scales only ``r``-wide tensors and accumulates the LoRA part of
    ``dL/dx`` into the base part in place. The unfused chain (``linear``, ``linear``, ``linear``,
    ``mul``, ``add``) writes three output-sized tensors forward, one more backward, plus the
    input-sized sum of the two ``dL/dx`` branches.

    ``x_lora`` is ``None`` when the LoRA branch sees ``x`` itself (no dropout). ``weight`` is the
    ``(out, in)`` view of the base weight; its and the bias's gradients are computed only when
    they require grad (``bias="all"``/``"lora_only"`` or an unfrozen base).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        x_lora: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        src = x if x_lora is None else x_lora
        out = F.linear(x, weight, bias)
        h = F.linear(src, lora_a)
        as_rows(out).addmm_(as_rows(h), lora_b.t(), alpha=scaling)
        # keep only what the wanted gradients read: with dropout the base input is not needed
        # unless the base weight trains (as in the unfused graph, where only the dropout output is)
        need_w, need_a, need_b = ctx.needs_input_grad[2], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        ctx.save_for_backward(
            x if need_w or (need_a and x_lora is None) else None,
            x_lora if need_a else None,
            h if need_b else None,
            weight,
            lora_a,
            lora_b,
        )
        ctx.shapes = (x.shape, None if x_lora is None else x_lora.shape)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, x_lora, h, weight, lora_a, lora_b = ctx.saved_tensors
        need_x, need_xl, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:6]
        x_shape, xl_shape = ctx.shapes
        fused_x = xl_shape is None  # the LoRA branch read x itself
        s = ctx.scaling
        g = as_rows(grad.contiguous())
        gx = gxl = gw = gbias = ga = gb = None
        gh = None
        if need_a or need_xl or (need_x and fused_x):
            gh = (g @ lora_b).mul_(s)  # (N, r): the only place the scaling touches activations
        if need_b:
            gb = (g.t() @ as_rows(h)).mul_(s)
        if need_a:
            ga = gh.t() @ as_rows((x if fused_x else x_lora).contiguous())  # type: ignore[union-attr]
        if need_x:
            gx = g @ weight
            if fused_x:
                gx.addmm_(gh, lora_a)  # type: ignore[arg-type]
            gx = gx.view(x_shape)
        if need_xl and not fused_x:
            gxl = (gh @ lora_a).view(xl_shape)  # type: ignore[operator]
        if need_w:
            gw = g.t() @ as_rows(x.contiguous())
        if need_bias and ctx.has_bias:
            gbias = g.sum(0)
        return gx, gxl, gw, gbias, ga, gb, None

