"""Grouped-query attention for one decode token without copying the KV cache per query head.

Why: Llama-style models keep fewer key/value heads than query heads (GQA: 8 for 32 at 1B and 8B).
transformers' ``sdpa`` attention, given a mask (which a left-padded static cache always needs)
and traced by ``torch.compile`` (which the own decode loop's CUDA-graphed step is), expands the
keys and values to one copy per query head (``repeat_kv``) before calling
``scaled_dot_product_attention``: every decode step writes and reads ``groups`` copies of the whole
static cache in every layer. At 8B shapes, batch 64 and a 384-position cache that is about 0.8 GB
of copies per layer per token, more traffic than the weights themselves.

How: with one query token the ``groups`` query heads that share a key/value head can be laid out
as that head's query *sequence*: ``q [b, H, 1, d] -> [b, H_kv, groups, d]``. Attention over the
unexpanded cache ``k, v [b, H_kv, C, d]`` with the mask ``[b, 1, 1, C]`` (broadcast over heads
and queries) then computes exactly the same dot products, softmaxes and sums, and reading the
output back as ``[b, H, 1, d]`` restores the head order (``repeat_kv`` maps query head ``h`` to
key/value head ``h // groups``, as the reshape does). Nothing causal is lost: a single query attends
to every unmasked position.

Everything else (prefill, more than one query token, no grouping, no mask, position biases) goes
to transformers' own ``sdpa_attention_forward`` unchanged. transformers 5.24 packs the same way in
eager mode but not while compiling; 5.17 not at all.

:func:`grouped_decode_attention` switches a model to it for a block (``config._attn_implementation``
is read at every forward, and restored after); the mask is built as for ``sdpa``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "raypeft_grouped_sdpa"


def grouped_sdpa_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query [b, H, q, d]``, ``key``/``value``
    ``[b, H_kv, k, d]``; returns ``[b, q, H, d]``."""
    groups = int(getattr(module, "num_key_value_groups", 1))
    batch, heads, q_len, _ = query.shape
    packable = (q_len == 1 and groups > 1 and attention_mask is not None and attention_mask.dim() == 4
                and attention_mask.shape[1] == 1 and kwargs.get("position_bias") is None
                and kwargs.get("softcap") is None and not kwargs.get("output_attentions", False))
    if not packable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    packed = query.reshape(batch, heads // groups, groups, query.shape[-1])
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, is_causal=False)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, grouped_sdpa_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


@contextlib.contextmanager
def grouped_decode_attention(lm: nn.Module) -> Iterator[bool]:
    """Run ``lm`` (a transformers model) with :func:`grouped_sdpa_forward` inside the block when it
    uses ``sdpa`` (other implementations are left alone: eager has no fused kernel to call, flash
    attention groups by itself). Yields whether it switched."""
    config = getattr(lm, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        yield False
        return
    config._attn_implementation = NAME
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"
