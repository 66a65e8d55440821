"""A folded generation copy of an adapted model: one dense weight per LoRA layer, ``W + delta``.

Sampling with an unmerged LoRA pays two extra small matmuls per adapted layer per token, and on a
4-bit base a dequantization as well; generation is memory-bound, so those extra passes dominate
at small batch. Merging in place (``merge`` / ``unmerge``) would be cheaper in memory but rounds
the base a little on every round trip, and an online-RL stage samples every step. This module
instead keeps a *separate* dense copy (``W0 + delta`` in the layer's compute dtype; a bf16 copy
of a 4-bit base, as DeepSpeed-Chat's hybrid engine does), refreshed from the current adapter
before each rollout and swapped into the module tree only while generating. The base parameters
are never written, so they stay bit-identical however many rollouts run.

The copy's modules are created once and refreshed in place, so a compiled decode step sees the
same modules every rollout and does not recompile.

Only layers whose update is a weight delta of a linear layer fold: LoRA, rsLoRA and DoRA on
``nn.Linear`` (and ``Conv1D``, seen as ``(out, in)``), on a plain or bitsandbytes-quantized base.
:func:`foldable` says whether every layer an adapter touches folds; the caller falls back to the
unmerged model otherwise (virtual tokens, bottleneck adapters, LoRA on embeddings, ...).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from raypeft.adapters import quantization as quant
from raypeft.adapters.layer import AdapterLayer
from raypeft.adapters.lora.linear import LoraLinear


# Sibling projections a decoder layer calls on one input, in this order (Llama, Mistral, Qwen,
# Gemma, ...): the copy stacks each group's folded weights into one matrix (``fuse_projections``).
SHARED_INPUT_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInput:
    """One group of sibling projections fed the same input, stacked: ``weight`` is their folded
    weights one above the other (each member's weight is a row view of it, so a refresh writes
    through), and the first member called on an input computes every member's output in one matmul
    and leaves the others' in ``pending`` for their calls.

    Why: at decode time a projection is a matrix-vector product bound by reading its weight, and
    the small ones run far from the bandwidth: at 8B shapes on an H200 the two 1024-row key and value
    projections of a layer took about as long as the 4096-row query projection. Stacked, they are
    one large read: 8,008 tokens/s against 7,509 unstacked in one run (``rollout_cuda_8b.md``).

    A member called on another input (or out of the group's usual order) computes its own rows only.
    The hand-over state is plain Python that the compiled decode step traces through and leaves empty
    after every layer, so the step's guards do not change from call to call."""

    def __init__(self, members: list["FoldedLinear"]) -> None:
        self.members = members
        self.sizes = [m.weight.shape[0] for m in members]
        self.weight = torch.cat([m.weight for m in members])
        start = 0
        for index, (member, size) in enumerate(zip(members, self.sizes)):
            member.weight = self.weight[start:start + size]
            member.group, member.index = self, index
            start += size
        self.bias: torch.Tensor | None = None
        self.refresh_bias()
        self.clear()

    def refresh_bias(self) -> None:
        """The members' biases stacked (zeros for a member without one; None when none has one)."""
        if all(m.bias is None for m in self.members):
            return
        self.bias = torch.cat([m.weight.new_zeros(size) if m.bias is None else m.bias.detach().to(m.weight.dtype)
                               for m, size in zip(self.members, self.sizes)])

    def clear(self) -> None:
        self.input: torch.Tensor | None = None
        self.pending: dict[int, torch.Tensor] = {}


class FoldedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` the folded ``(out, in)`` weight; holds no gradients.

    Computed in the weight's dtype (the layer's compute dtype) and returned in the input's, as a
    bitsandbytes 4-bit layer does: a k-bit-prepared model keeps its norms in float32, so the
    activations reaching a projection are float32 while the weight is bf16. Casting the weight to
    the input instead would convert the whole copy to float32 on every forward (measured on an
    H200, 8B shapes with an NF4 base: 52 ms per decode step instead of about 9).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.bias = bias  # the base layer's own bias tensor (shared, never written)
        self.group: SharedInput | None = None
        self.index = 0

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        dtype = weight.dtype
        return F.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        if group is None:
            return self._linear(x, self.weight, self.bias)
        if group.input is x and self.index in group.pending:
            out = group.pending.pop(self.index)
            if not group.pending:
                group.input = None
            return out
        if group.input is not None:  # a member called on another input: its own rows only
            return self._linear(x, self.weight, self.bias)
        parts = self._linear(x, group.weight, group.bias).split(group.sizes, dim=-1)
        group.input = x
        group.pending = {i: part for i, part in enumerate(parts) if i != self.index}
        return parts[self.index]


def _holders(model: nn.Module, adapter_name: str) -> Iterator[tuple[str, nn.Module, str, AdapterLayer]]:
    """``(qualified name, parent, attribute, layer)`` of every adapter layer holding ``adapter_name``."""
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, AdapterLayer) and adapter_name in child.adapter_names:
                yield (f"{name}.{attr}" if name else attr), module, attr, child


def foldable(model: nn.Module, adapter_name: str) -> bool:
    """Whether every layer holding ``adapter_name`` can be folded (and at least one holds it)."""
    layers = [layer for *_, layer in _holders(model, adapter_name)]
    return bool(layers) and all(type(layer) is LoraLinear for layer in layers)


def _folded_weight(layer: LoraLinear, adapter_name: str, dtype: torch.dtype) -> torch.Tensor:
    """``W0 + delta`` as ``(out, in)`` in ``dtype``: :func:`_fold_plain` for LoRA, computed in
    float32 from the dense base for DoRA (whose delta needs the base's norms)."""
    with torch.no_grad():
        if adapter_name not in layer.lora_magnitude_vector:
            a, b = layer._lora_pair(adapter_name)
            out = torch.empty(b.shape[0], a.shape[1], dtype=dtype, device=b.device)
            _fold_plain(layer, adapter_name, out)
            return out
        base = layer._dense_weight_oi().float()
        created = adapter_name not in layer._dora_factors
        delta = layer._merge_delta_oi(adapter_name, base)
        if created:  # a DoRA merge caches its factor for unmerge; nothing is merged here
            layer._dora_factors.pop(adapter_name, None)
        return (base + delta).to(dtype)


def _fold_plain(layer: LoraLinear, adapter_name: str, out: torch.Tensor) -> None:
    """Write ``W0 + s B A`` into ``out`` with one ``addmm``: the rank-r product accumulated in
    float32 and added to the base in the matmul's epilogue, rounded once into ``out``'s dtype.

    Why one kernel: the refresh runs before every rollout over every adapted weight. Written as
    ``B @ A``, ``* s``, a float32 upcast and an add, it made four full-size passes; here the base is
    read once and ``out`` written once: 18.9 ms against 60.6 ms per refresh at 8B shapes in bf16
    on an H200 (``benchmarks/results/rollout_cuda_8b.md``). On CPU, half precision goes through
    float32, as in ``_matmul``."""
    with torch.no_grad():
        base = layer._dense_weight_oi()
        a, b = layer._lora_pair(adapter_name)
        scale = float(layer.scaling[adapter_name])
        dtype = out.dtype
        if out.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            out.copy_(torch.addmm(base.float(), b.float(), a.float(), alpha=scale))
        else:
            torch.addmm(base.to(dtype), b.to(dtype), a.to(dtype), alpha=scale, out=out)


def _fold_into(layer: LoraLinear, adapter_name: str, out: torch.Tensor) -> None:
    """Write ``W0 + delta`` into ``out`` (the copy's weight), bit for bit what
    :func:`_folded_weight` returns (:func:`_fold_plain` in place for plain LoRA)."""
    if adapter_name in layer.lora_magnitude_vector:  # DoRA: its delta needs the float32 base
        out.copy_(_folded_weight(layer, adapter_name, out.dtype))
        return
    _fold_plain(layer, adapter_name, out)


def _compute_dtype(layer: LoraLinear) -> torch.dtype:
    base = layer.base_layer
    return quant.compute_dtype(base) if quant.is_quantized(base) else base.weight.dtype


class GenerationCopy:
    """The folded copy of one adapter over a model; :meth:`refresh` after the adapter changed,
    :meth:`swapped_in` around ``generate``."""

    def __init__(self, model: nn.Module, adapter_name: str, *, fuse_projections: bool = True) -> None:
        if not foldable(model, adapter_name):
            raise ValueError(f"adapter {adapter_name!r} has layers that do not fold into a weight "
                             "(only LoRA / rsLoRA / DoRA on linear layers do)")
        self.adapter_name = adapter_name
        self._slots: list[tuple[nn.Module, str, LoraLinear, FoldedLinear]] = []
        for _, parent, attr, layer in _holders(model, adapter_name):
            weight = _folded_weight(layer, adapter_name, _compute_dtype(layer))
            self._slots.append((parent, attr, layer, FoldedLinear(weight, getattr(layer.base_layer, "bias", None))))
        self.groups = _stack_groups(self._slots) if fuse_projections else []

    @property
    def num_bytes(self) -> int:
        return sum(f.weight.numel() * f.weight.element_size() for *_, f in self._slots)

    def refresh(self) -> None:
        """Recompute every folded weight from the adapter's current tensors, in place."""
        for _, _, layer, folded in self._slots:
            _fold_into(layer, self.adapter_name, folded.weight)
        for group in self.groups:
            group.refresh_bias()

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The folded modules in place of their adapter layers; the layers come back on exit."""
        done: list[tuple[nn.Module, str, LoraLinear]] = []
        try:
            for parent, attr, layer, folded in self._slots:
                setattr(parent, attr, folded)
                done.append((parent, attr, layer))
            yield
        finally:
            for parent, attr, layer in reversed(done):
                setattr(parent, attr, layer)
            for group in self.groups:  # no input or output outlives the call
                group.clear()


def _stack_groups(slots: list[tuple[nn.Module, str, LoraLinear, FoldedLinear]]) -> list[SharedInput]:
    """A :class:`SharedInput` for each :data:`SHARED_INPUT_GROUPS` whose members are all folded
    under one parent, with one dtype, device and input size."""
    by_parent: dict[int, dict[str, FoldedLinear]] = {}
    for parent, attr, _, folded in slots:
        by_parent.setdefault(id(parent), {})[attr] = folded
    groups = []
    for children in by_parent.values():
        for names in SHARED_INPUT_GROUPS:
            members = [children.get(name) for name in names]
            if any(m is None for m in members):
                continue
            shapes = {(m.weight.dtype, m.weight.device, m.weight.shape[1]) for m in members}
            if len(shapes) == 1:
                groups.append(SharedInput(members))
    return groups
