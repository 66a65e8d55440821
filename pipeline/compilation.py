"""``torch.compile`` for the training loops of the SFT, reward and DPO stages (``<stage>.compile``).

Why: a 1B LoRA step on an H200 is bound by the host, not the GPU. At 64 packed rows (18k tokens)
the eager step takes 0.33 s, of which its kernels fill a little over half: Python launches the
norms, rotary embeddings, activations and residual adds one kernel at a time, each a full pass
over the activations. Compiled, Inductor fuses those into a few kernels per layer; with the chunked
loss compiled too the step took 0.25 s (33% of the bf16 peak against 25%), DPO's 0.12 s against
0.16 (``python benchmarks/vs_trl.py --device cuda --size 1b --compile ...``,
``benchmarks/results/vs_trl_{sft_1b_b64,dpo_1b}_cuda.md``), and 0.236 s (35.5%) once the loss's
head gradient was fused (``vs_trl_sft_1b_b64_compiled_cuda.md``).

What is compiled: the decoder stack only (the transformers model's ``base_model_prefix`` module:
its layers, norms and rotary embedding), in place, for the duration of the training loop
(:func:`compiled`). The embedding lookup, the LM head and the loss stay eager, except the chunked
loss's per-chunk head-and-cross-entropy, which :mod:`pipeline.lm_head_loss` compiles too while the
stack runs compiled (:func:`is_compiled`), so the float32 logits of a chunk are reduced in fused
kernels instead of written out. Outside the loop the stack runs eagerly again: held-out
generation (ROUGE) would otherwise trace every decoding length and its cache objects.

The first steps pay compilation: tens of seconds per graph at 1B. A batch of a new shape costs one
recompile, after which dynamo treats the changing dimensions as dynamic; a new grad mode
(evaluation, DPO's reference under ``no_grad``) or role (the reference runs with the adapter
disabled) more graphs. In the DPO benchmark those compiles ran into the first 20 steps (about a
minute in all), which is why it is off by default: it pays on long runs.

Not under DeepSpeed: ZeRO-3 gathers each layer's partitioned weights in module hooks, which split the
graph at every layer; the config refuses the combination (``check_adapter_setup``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a DeepSpeed engine (``.module``), a ``Roles`` (the
    ``AdapterModel`` it holds) and/or an ``AdapterModel``; ``model`` itself otherwise."""
    inner = getattr(model, "module", model)
    held = getattr(inner, "model", None)
    if not hasattr(inner, "get_base_model") and hasattr(held, "get_base_model"):
        inner = held  # a Roles
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def decoder_stack(model: nn.Module) -> nn.Module | None:
    """The decoder stack (the ``base_model_prefix`` module) of :func:`transformers_model`, or ``None``."""
    lm = transformers_model(model)
    prefix = getattr(lm, "base_model_prefix", "")
    stack = getattr(lm, prefix, None) if prefix else None
    return stack if isinstance(stack, nn.Module) and stack is not lm else None


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model``'s decoder stack currently runs compiled (inside :func:`compiled`)."""
    stack = decoder_stack(model)
    return stack is not None and getattr(stack, "_compiled_call_impl", None) is not None


@contextlib.contextmanager
def compiled(model: nn.Module, on: bool = True, *, backend: str = "inductor",
             dynamic: bool | None = None) -> Iterator[None]:
    """Run ``model``'s decoder stack through ``torch.compile`` inside the block (a no-op when
    ``on`` is false or no stack is found); it runs eagerly again on exit. Dynamo keeps what it
    compiled per code object, so a second block reuses the first one's graphs. ``backend``: the
    stages use Inductor; tests may trace without code generation (``"aot_eager"``). ``dynamic``:
    torch's default (``None``) specialises on the first shapes and recompiles with the dimensions
    that changed made symbolic, a few compiles per grad mode and role in the first steps (the
    setting measured on the GPU); ``True`` traces them symbolic from the start."""
    stack = decoder_stack(model) if on else None
    if stack is None or stack._compiled_call_impl is not None:  # nothing to compile, or already compiled
        yield
        return
    stack.compile(backend=backend, dynamic=dynamic)
    try:
        yield
    finally:
        stack._compiled_call_impl = None
