"""The causal-LM loss without the full-vocabulary logits.

Why: a transformers causal LM asked for its loss first projects every position through the LM
head and upcasts the logits to float32 for the cross-entropy. With a 128k vocabulary a micro-batch
of 16 x 1024 positions is 2.1e9 logits: 4 GiB in bf16, 8 GiB more in float32, and their gradient
again, most of it for prompt and padding positions that carry no label. On an H200 that made our
padded 1B SFT step peak at 52 GiB where TRL's (which projects only labelled positions, in tiles)
peaks at 34 (``benchmarks/results/vs_trl_sft_1b_cuda.md``, before this module).

How: the model runs with ``logits_to_keep=1`` (its own head projects one position) and returns
its final hidden states; only the positions whose next token is labelled are gathered, and they
go through the LM head in chunks of ``chunk`` rows, so that one chunk's float32 logits exist at a
time. The mean over labelled tokens is the model's own loss (``tests/pipeline/test_lm_head_loss.py``:
loss and gradients against ``model(**batch).loss``, padded and packed, LoRA and a virtual-token
method).

Two ways to get the gradient through a chunk:

- *Fused* (:class:`_FusedHead`), when the head is a plain frozen ``nn.Linear`` (the usual case:
  adapters do not touch it): a token's log-probability then reaches the trainable weights only
  through its own hidden state, so its gradient with respect to that state,
  ``W^T (onehot - softmax) / T``, is computed in the forward while the chunk's logits exist, and the
  backward multiplies it by the incoming gradient (one number per token). The head's matmul runs
  twice per chunk (logits, then that gradient) instead of three times (forward, recompute,
  backward); at a 128k vocabulary the head is a fifth of a 1B model's FLOPs.
- *Checkpointed* otherwise (an adapter or hooks on the head, a trainable head, ZeRO-3's
  partitioned weight): each chunk under activation checkpointing, so the logits exist again in the
  backward and the head's matmul is recomputed.

On the checkpointed path the LM head is called as a module, so an adapter on it, and DeepSpeed
ZeRO-3's gathering of its partitioned weight, apply as in the model's forward. Models whose
logits are more than the head's output (a final soft-cap, a logit scale) or that take no
``logits_to_keep`` (encoder-decoders) use the model's own loss: :func:`supports` says which.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from raypeft.pipeline.compilation import is_compiled, transformers_model
from raypeft.pipeline.data import IGNORE_INDEX
from raypeft.pipeline.rl_math.tokens import at_least_float32

DEFAULT_CHUNK = 1024


def supports(model: nn.Module) -> bool:
    """Whether :func:`causal_lm_loss` computes ``model``'s loss: a decoder-only LM whose logits
    are its output embedding's output, and whose forward takes ``logits_to_keep``."""
    lm = transformers_model(model)
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "final_logit_softcapping", None) or getattr(text, "logit_scale", 1.0) not in (None, 1.0):
        return False
    if not hasattr(lm, "get_output_embeddings") or lm.get_output_embeddings() is None:
        return False
    try:
        return "logits_to_keep" in inspect.signature(lm.forward).parameters
    except (TypeError, ValueError):
        return False


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(at_least_float32(head(hidden)), targets, reduction="sum")


def _chunk_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    logits = at_least_float32(head(hidden))
    return -F.cross_entropy(logits / temperature if temperature != 1.0 else logits, targets, reduction="none")


def _chunk_terms(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities and (without gradients: a metric) entropies of one chunk."""
    logits = at_least_float32(head(hidden))
    logits = logits / temperature if temperature != 1.0 else logits
    with torch.no_grad():
        logp_all = F.log_softmax(logits, dim=-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return -F.cross_entropy(logits, targets, reduction="none"), entropy


_COMPILED: dict[Any, Any] = {}


def _compiled(fn: Any) -> Any:
    """``fn`` through ``torch.compile`` (one wrapper per function; chunk sizes vary, so dynamic):
    the chunk's float32 cast, log-softmax and gather fused instead of each written out."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def _head_chunk(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                temperature: float, want_grad: bool, want_entropy: bool):
    """One chunk through a linear head: the (at least float32) log-probabilities of ``targets`` at
    ``temperature``, the entropies (``want_entropy``) and the gradient of each log-probability with
    respect to its hidden state, ``W^T (onehot - softmax) / T`` in ``hidden``'s dtype (``want_grad``)."""
    logits = at_least_float32(F.linear(hidden, weight, bias))
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    entropy = grad = None
    if want_grad or want_entropy:
        probs = torch.exp(logits - lse[:, None])
        if want_entropy:  # -sum p log p = lse - sum p z
            entropy = lse - (probs * logits).sum(-1)
        if want_grad:
            d = torch.zeros_like(probs).scatter_(-1, targets[:, None], 1.0) - probs
            if temperature != 1.0:
                d = d / temperature
            grad = d.to(hidden.dtype) @ weight.to(hidden.dtype)
    return logp, entropy, grad


def _head_chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 temperature: float, chunk: int, want_grad: bool, want_entropy: bool, compiled: bool):
    """:func:`_head_chunk` over ``chunk``-row pieces (through ``torch.compile`` with ``compiled``):
    the pieces' log-probabilities, entropies and gradients, each concatenated (None where not asked)."""
    fn = _compiled(_head_chunk) if compiled else _head_chunk
    pieces = [fn(hidden[s:s + chunk], weight, bias, targets[s:s + chunk], temperature, want_grad, want_entropy)
              for s in range(0, targets.numel(), chunk)]
    return tuple(None if part[0] is None else torch.cat(part) for part in zip(*pieces))


class _FusedHead(torch.autograd.Function):
    """Log-probabilities (and entropies, no gradient) of ``targets`` through a frozen linear head,
    chunk by chunk, with each hidden state's gradient computed in the forward (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, want_entropy, compiled):
        logp, entropy, grad = _head_chunks(hidden, weight, bias, targets, temperature, chunk, True, want_entropy,
                                           compiled)
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        (grad,) = ctx.saved_tensors
        if grad_logp is None:
            return (None,) * 8
        return (grad_logp[:, None] * grad).to(ctx.hidden_dtype), None, None, None, None, None, None, None


def _fusable(head: nn.Module) -> bool:
    """Whether :class:`_FusedHead` computes ``head``'s part exactly: a plain ``nn.Linear`` (no
    adapter or quantized subclass), frozen, called without hooks (DeepSpeed's ZeRO-3 gathers a
    partitioned weight in one; a caller's hook expects the module to be called)."""
    if type(head) is not nn.Linear or head.weight.requires_grad or hasattr(head.weight, "ds_id"):
        return False
    if head.bias is not None and head.bias.requires_grad:
        return False
    return not (head._forward_hooks or head._forward_pre_hooks or head._backward_hooks
                or torch.nn.modules.module._global_forward_hooks
                or torch.nn.modules.module._global_forward_pre_hooks)


def _head_terms(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int, temperature: float,
                want_entropy: bool, compiled: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Log-probabilities (and entropies) of ``targets`` through ``head`` by :class:`_FusedHead`, or
    without a graph when none is needed; None where the checkpointed path must do it."""
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if not _fusable(head):
        return None
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _FusedHead.apply(hidden, head.weight, head.bias, targets, float(temperature), chunk, want_entropy,
                                compiled)
    return _head_chunks(hidden, head.weight, head.bias, targets, float(temperature), chunk, False, want_entropy,
                        compiled)[:2]


def _labelled(model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor):
    """The final hidden states of the positions whose next token is labelled, those tokens, the
    ``[B, T-1]`` mask of them, and the whole last hidden state (one forward, ``logits_to_keep=1``).

    Where the labelled positions are is read (the loss's one host sync) before the forward is
    queued, not by a boolean index after it: a sync there would leave the GPU idle while the host
    launched the rest of the step, and a compiled 1B step's host time is about its device time."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rows, cols = keep.nonzero(as_tuple=True)
    width = labels.shape[1]
    flat = rows * width + cols  # positions in the [B * T] flattening; each one's target is the next
    out = model(**inputs, logits_to_keep=1, output_hidden_states=True)
    # virtual-token adapters prepend positions: keep the ones aligned with the labels
    hidden = out.hidden_states[-1][:, -width:]
    chosen = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat)
    return chosen, labels.reshape(-1).index_select(0, flat + 1), keep, hidden


def _chunked(fn: Any, head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int,
             *extra: Any, compiled: bool = False) -> list[Any]:
    """``fn`` over ``chunk``-row pieces, each under activation checkpointing when it builds a graph
    (``compiled``: ``fn`` through ``torch.compile``, while the decoder stack runs compiled).

    Re-entrant checkpointing: the recompute calls the head as a module again inside the backward,
    where DeepSpeed ZeRO-3's hooks gather its partitioned weight for it; the non-re-entrant kind
    checks the recomputed tensors against the saved ones and finds the released partition
    (``tests/pipeline/test_deepspeed_stages_ray.py`` runs it under ZeRO-3 offload). ``chunk`` is
    checked by :func:`_head_terms`, which the callers ask first."""
    fn = _compiled(fn) if compiled else fn
    pieces = []
    for start in range(0, targets.numel(), chunk):
        args = (head, hidden[start:start + chunk], targets[start:start + chunk], *extra)
        grad = torch.is_grad_enabled() and args[1].requires_grad
        pieces.append(checkpoint(fn, *args, use_reentrant=True) if grad else fn(*args))
    return pieces


def causal_lm_loss(model: nn.Module, batch: dict[str, Any], *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The mean next-token cross-entropy over the labelled tokens of ``batch`` (``labels`` with
    -100 where there is none, as for ``model(**batch).loss``), projecting only those positions."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    chosen, targets, _, hidden = _labelled(model, inputs, batch["labels"])
    if targets.numel() == 0:
        return hidden.sum() * 0.0  # nothing labelled: a zero that still reaches every trainable weight
    head = transformers_model(model).get_output_embeddings()
    fused = _head_terms(head, chosen, targets, chunk, 1.0, False, is_compiled(model))
    if fused is not None:
        return -fused[0].sum() / targets.numel()
    pieces = _chunked(_chunk_loss, head, chosen, targets, chunk, compiled=is_compiled(model))
    return torch.stack(pieces).sum() / targets.numel()


def label_logprobs(model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor, *,
                   chunk: int = DEFAULT_CHUNK, temperature: float = 1.0) -> torch.Tensor:
    """``[B, T-1]``: the (at least float32) log-probability of each labelled next token (``labels[:, 1:]``)
    and 0 where there is no label, what ``token_logprobs(logits[:, :-1] / temperature, labels[:, 1:]) * mask``
    gives from the full logits, projecting only the labelled positions."""
    return label_terms(model, inputs, labels, chunk=chunk, temperature=temperature, with_entropy=False)[0]


def label_terms(model: nn.Module, inputs: dict[str, Any], labels: torch.Tensor, *, chunk: int = DEFAULT_CHUNK,
                temperature: float = 1.0, with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`label_logprobs` and, with ``with_entropy``, the entropy of the (tempered) next-token
    distribution at the same positions (``[B, T-1]``, 0 where there is no label; no gradient: the
    RL stages report it, none optimises it): what an online stage needs of its policy's
    response tokens without the logits of every prompt position and the whole vocabulary."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    chosen, targets, keep, hidden = _labelled(model, inputs, labels)
    out = hidden.new_zeros(keep.shape, dtype=torch.promote_types(hidden.dtype, torch.float32))
    if targets.numel() == 0:
        return out + hidden.sum() * 0.0, (out.clone() if with_entropy else None)
    head = transformers_model(model).get_output_embeddings()
    fused = _head_terms(head, chosen, targets, chunk, temperature, with_entropy, is_compiled(model))
    if fused is not None:
        logp = out.masked_scatter(keep, fused[0])
        return logp, (out.detach().masked_scatter(keep, fused[1]) if with_entropy else None)
    if not with_entropy:
        pieces = _chunked(_chunk_logprobs, head, chosen, targets, chunk, float(temperature),
                          compiled=is_compiled(model))
        return out.masked_scatter(keep, torch.cat(pieces)), None
    pieces = _chunked(_chunk_terms, head, chosen, targets, chunk, float(temperature))
    logp = out.masked_scatter(keep, torch.cat([p[0] for p in pieces]))
    return logp, out.detach().masked_scatter(keep, torch.cat([p[1] for p in pieces]).detach())


def enabled(setting: bool | str, model: nn.Module, device: torch.device) -> bool:
    """Whether a stage's ``chunked_loss`` setting (true / false / "auto") uses :func:`causal_lm_loss`
    for ``model`` on ``device``: auto is on for CUDA workers; a model :func:`supports` refuses always
    falls back to its own loss."""
    if setting is False or not supports(model):
        return False
    return setting is True or device.type == "cuda"
