"""Quantized base layers (bitsandbytes 4-bit / 8-bit): detect, dequantize, re-quantize, prepare.

bitsandbytes is optional. Nothing here imports it at module import time: a model can only hold
bitsandbytes layers if bitsandbytes was imported already, so detection looks it up in
``sys.modules`` and ``adapters`` imports (and plain LoRA works) without it installed. Only the
functions that build or rebuild quantized weights import it, and they say so when it is missing.

What the LoRA layers need from a quantized base:

* :func:`dense_weight` -- the ``(out, in)`` weight as a float tensor (dequantized), for DoRA's
  column norms and for merging;
* :func:`replace_weight` -- write a float weight back, quantized with the layer's own settings
  (4-bit: quant type, block size, double quantization, storage dtype; 8-bit: row-wise int8);
* :func:`snapshot_weight` / :func:`restore_weight` -- keep the original quantized tensor while
  adapters are merged, so unmerging gives back the exact base rather than a twice-rounded one.

bitsandbytes >= 0.49 repacks a 4-bit weight in place into a CPU-specific layout on its first
eval-mode, no-grad forward on CPUs with AVX512-BF16; :func:`dense_weight` reads both layouts.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from .targeting import output_head_names

QuantKind = Literal["4bit", "8bit"]
_KEEP_IN_FP32 = ("all", "norms", "none")


def _loaded_bnb() -> Any | None:
    """bitsandbytes if it has been imported (no import is triggered here)."""
    return sys.modules.get("bitsandbytes")


def bnb_available() -> bool:
    """True when bitsandbytes can be imported (imports it)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # ImportError, or a broken native library raising at import
        return False
    return True


def require_bnb() -> Any:
    """Import bitsandbytes or raise an ``ImportError`` that says what needs it."""
    try:
        import bitsandbytes as bnb
    except Exception as exc:
        raise ImportError(
            "quantized base layers need bitsandbytes (pip install 'bitsandbytes>=0.45'); import failed: "
            f"{exc}"
        ) from exc
    return bnb


def quant_kind(module: nn.Module) -> QuantKind | None:
    """``"4bit"``/``"8bit"`` when ``module`` holds an already quantized bitsandbytes weight, else ``None``.

    A ``Linear4bit`` whose weight has not been quantized yet (it quantizes on ``.to(device)``) or a
    ``Linear8bitLt`` with ``has_fp16_weights`` holds a float weight and counts as not quantized.
    """
    bnb = _loaded_bnb()
    if bnb is None:
        return None
    weight = getattr(module, "weight", None)
    if isinstance(weight, bnb.nn.Params4bit) and getattr(weight, "bnb_quantized", False):
        return "4bit"
    if isinstance(weight, bnb.nn.Int8Params) and weight.dtype == torch.int8:
        return "8bit"
    return None


def is_quantized(module: nn.Module) -> bool:
    return quant_kind(module) is not None


def is_quantized_param(param: torch.Tensor) -> bool:
    """A bitsandbytes weight tensor (4-bit packed or int8): never cast, never trained."""
    bnb = _loaded_bnb()
    return bnb is not None and isinstance(param, (bnb.nn.Params4bit, bnb.nn.Int8Params))


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a quantized layer computes in (``bnb_4bit_compute_dtype``); float32 when unset/8-bit."""
    dtype = getattr(module, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


# ---------------------------------------------------------------------- dequantize
def _unpack_cpu_layout(data: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """The standard 4-bit layout of a weight bitsandbytes repacked for its CPU kernel, without
    touching the layer: the repacked absmax (bf16, un-nested) is what the CPU forward uses, so it is
    kept as is instead of re-quantizing it the way bitsandbytes' own inverse does."""
    from bitsandbytes import functional as bnbf

    inverse = getattr(bnbf, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:  # pragma: no cover - only versions that pack also ship the inverse
        raise RuntimeError("this bitsandbytes packs 4-bit weights for CPU but has no inverse; cannot dequantize")
    work = copy.copy(state)
    work.original_nested = False  # keep absmax as the forward sees it
    qweight, work = inverse(data, work)
    work.absmax = state.absmax.T.reshape(-1).float()
    work.nested = False
    return qweight, work


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of ``module`` as a float ``(out, in)`` tensor.

    Quantized layers give a fresh dequantized tensor (4-bit: in the dtype it was quantized from;
    8-bit: float32); any other module gives its own ``weight`` parameter (no copy).
    """
    kind = quant_kind(module)
    weight = module.weight
    if kind is None:
        return weight  # type: ignore[return-value]
    bnb = _loaded_bnb()
    if kind == "4bit":
        state = weight.quant_state
        data = weight.data
        if getattr(state, "packing_format_for_cpu", False):
            data, state = _unpack_cpu_layout(data, state)
        return bnb.functional.dequantize_4bit(data, state)
    scb = getattr(weight, "SCB", None)
    if scb is None:  # after the first forward Linear8bitLt keeps the row scales in its state
        scb = module.state.SCB
    if scb is None:
        raise RuntimeError("8-bit layer has no row scales (SCB); move it to its device before use")
    return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device)).float()


# ---------------------------------------------------------------------- re-quantize
def replace_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Quantize float ``weight`` ``(out, in)`` with ``module``'s own settings and install it."""
    kind = quant_kind(module)
    if kind is None:
        raise TypeError(f"replace_weight expects a quantized bitsandbytes layer, got {type(module).__name__}")
    bnb = require_bnb()
    old = module.weight
    if tuple(weight.shape) != (module.out_features, module.in_features):
        raise ValueError(
            f"replace_weight: weight must be {(module.out_features, module.in_features)}, got {tuple(weight.shape)}"
        )
    if kind == "4bit":
        state = old.quant_state
        packed = getattr(state, "packing_format_for_cpu", False)
        source_dtype = state.original_dtype if packed else state.dtype
        new = bnb.nn.Params4bit(
            weight.detach().to(dtype=source_dtype).contiguous(),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=module,
        )
        module.weight = new.to(old.device)  # quantizes (and sets module.quant_state)
        return
    # Int8Params quantizes when moved from CPU to a device
    new8 = bnb.nn.Int8Params(
        weight.detach().to("cpu", torch.float32), requires_grad=False, has_fp16_weights=old.has_fp16_weights
    )
    module.weight = new8.to(old.device)
    module.state.CB = None
    module.state.SCB = None


def snapshot_weight(module: nn.Module) -> tuple[Any, ...]:
    """Everything :func:`restore_weight` needs to put the current quantized weight back exactly."""
    kind = quant_kind(module)
    if kind == "4bit":
        return ("4bit", module.weight, getattr(module, "quant_state", None))
    if kind == "8bit":
        return ("8bit", module.weight, module.state.CB, module.state.SCB)
    raise TypeError(f"snapshot_weight expects a quantized bitsandbytes layer, got {type(module).__name__}")


def restore_weight(module: nn.Module, snapshot: tuple[Any, ...]) -> None:
    if snapshot[0] == "4bit":
        _, module.weight, module.quant_state = snapshot
    else:
        _, module.weight, module.state.CB, module.state.SCB = snapshot


# ---------------------------------------------------------------------- building quantized models
def _suffix_match(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def quantize_linear_layers(
    model: nn.Module,
    bits: int = 4,
    *,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = torch.float32,
    quant_storage: torch.dtype = torch.uint8,
    skip_modules: Iterable[str] | None = None,
    threshold: float = 6.0,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by a bitsandbytes ``Linear4bit``/``Linear8bitLt``.

    The in-memory equivalent of loading with ``transformers.BitsAndBytesConfig`` (same layers, same
    quantized values), for models built from a config -- tests and the embedded demo have no
    checkpoint to load. ``skip_modules`` (suffixes) stay in full precision; by default the output
    head, as transformers does. Like transformers' quantizer, the model's own
    ``_keep_in_fp32_modules`` (T5's ``wo``, whose forward casts its input to the weight's dtype, a
    packed uint8 once quantized) are always skipped too. Quantization happens on each layer's
    current device. Sets ``model.is_loaded_in_4bit``/``is_loaded_in_8bit``, the flags transformers
    sets and peft reads. Returns ``model`` (modified in place).
    """
    if bits not in (4, 8):
        raise ValueError(f"quantize_linear_layers: bits must be 4 or 8, got {bits!r}")
    if bits == 4 and quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quantize_linear_layers: quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    bnb = require_bnb()
    if skip_modules is None:
        skip = sorted(output_head_names(model, getattr(model, "task_type", None)))
    else:
        skip = list(skip_modules)
    skip += sorted(keep_in_fp32_module_names(model))
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not any(_suffix_match(name, s) for s in skip)
    ]
    if not targets:
        raise ValueError("quantize_linear_layers: the model has no nn.Linear layer to quantize")
    for name, linear in targets:
        device = linear.weight.device
        has_bias = linear.bias is not None
        if bits == 4:
            new: nn.Module = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=has_bias,
                compute_dtype=compute_dtype,
                compress_statistics=double_quant,
                quant_type=quant_type,
                quant_storage=quant_storage,
                device="meta",
            )
            new.weight = bnb.nn.Params4bit(
                linear.weight.detach().clone(),
                requires_grad=False,
                compress_statistics=double_quant,
                quant_type=quant_type,
                quant_storage=quant_storage,
                module=new,
            ).to(device)
        else:
            new = bnb.nn.Linear8bitLt(
                linear.in_features,
                linear.out_features,
                bias=has_bias,
                has_fp16_weights=False,
                threshold=threshold,
                device="meta",
            )
            new.weight = bnb.nn.Int8Params(
                linear.weight.detach().to("cpu").clone(), requires_grad=False, has_fp16_weights=False
            ).to(device)
        if has_bias:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        new.train(linear.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    setattr(model, "is_loaded_in_4bit" if bits == 4 else "is_loaded_in_8bit", True)
    return model


def keep_in_fp32_module_names(model: nn.Module) -> set[str]:
    """Module name suffixes the model's classes ask to keep in float32 (transformers'
    ``_keep_in_fp32_modules`` and ``_keep_in_fp32_modules_strict``, on the model or any submodel)."""
    names: set[str] = set()
    for module in model.modules():
        for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
            names.update(getattr(module, attr, None) or ())
    return names


# ---------------------------------------------------------------------- training preparation
def _upcast(params: Iterable[torch.Tensor]) -> None:
    for param in params:
        if param.dtype in (torch.float16, torch.bfloat16) and not is_quantized_param(param):
            param.data = param.data.to(torch.float32)


def _all_but_input_embeddings(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter except the input token embedding table's (kept when the output head shares it)."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    table = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    skip = {id(p) for p in table.parameters()} if isinstance(table, nn.Module) else set()
    if isinstance(head, nn.Module):
        skip -= {id(p) for p in head.parameters()}  # tied: the head computes the loss, it stays fp32
    return [p for p in model.parameters() if id(p) not in skip]


def make_inputs_require_grad(model: nn.Module) -> None:
    """Make the input embeddings' output require grad, so gradients reach adapters behind frozen,
    checkpointed blocks (needed by re-entrant checkpointing; harmless otherwise)."""
    if hasattr(model, "enable_input_require_grads"):
        if not getattr(model, "_require_grads_hooks", None):  # transformers' checkpointing may have done it
            model.enable_input_require_grads()
        return
    get_in = getattr(model, "get_input_embeddings", None)
    if not callable(get_in) or get_in() is None:
        raise TypeError(f"{type(model).__name__} has no get_input_embeddings(); cannot make its inputs require grad")

    def _hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        output.requires_grad_(True)

    get_in().register_forward_hook(_hook)


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    keep_in_fp32: str = "all",
) -> nn.Module:
    """Get a (k-bit quantized) base ready for adapter training, before adapters are added.

    * every base parameter is frozen (adapters added afterwards are the only trainable tensors);
    * half-precision parameters that are not quantized move to float32: ``keep_in_fp32="all"``
      (every one: embeddings, norms, head -- what peft does), ``"norms"`` (every one but the input
      token embeddings: saves the memory of a large vocabulary table), or ``"none"``; norms in
      bf16/fp16 are where low-precision training becomes unstable, the head is where the loss is
      computed. Once a norm runs in float32 the hidden states after it are float32, so under
      ``"norms"`` every other unquantized weight that meets them (T5's relative position bias,
      added to float32 attention scores; its fp32-only ``wo``; biases; layers left unquantized)
      is float32 as well -- a half-precision one would be a dtype mismatch in the forward;
    * with ``use_gradient_checkpointing``: activation checkpointing with
      ``gradient_checkpointing_kwargs`` (default ``{"use_reentrant": False}``) and input
      embeddings whose output requires grad.

    Returns ``model`` (modified in place).
    """
    if keep_in_fp32 not in _KEEP_IN_FP32:
        raise ValueError(f"keep_in_fp32 must be one of {_KEEP_IN_FP32}, got {keep_in_fp32!r}")
    for param in model.parameters():
        param.requires_grad_(False)
    if keep_in_fp32 == "all":
        _upcast(model.parameters())
    elif keep_in_fp32 == "norms":
        _upcast(_all_but_input_embeddings(model))
    if use_gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if gradient_checkpointing_kwargs is not None:
            kwargs = dict(gradient_checkpointing_kwargs)
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise TypeError(
                f"use_gradient_checkpointing=True needs a transformers model, got {type(model).__name__}"
            )
        make_inputs_require_grad(model)
    return model
