"""Choosing the next token from logits: greedy, or sampling with temperature, top-k and top-p.

The same distribution as transformers' ``generate`` with the same settings (its
``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and ``TopPLogitsWarper``, applied in that order
on float32 scores; ``tests/pipeline/test_decode_loop.py`` compares the filtered scores exactly):

- temperature: ``s = z / T``;
- top-k: every score below the k-th largest becomes ``-inf`` (ties with the k-th are kept);
- top-p: scores sorted ascending, ``c`` the cumulative softmax; a token goes when
  ``c <= 1 - p``, the largest token always stays;
- greedy: ``argmax z`` (the first index among equal maxima, as ``torch.argmax``).

A sampled token is drawn by the Gumbel-max trick, ``argmax(s + g)`` with ``g = -log(-log u)``,
``u ~ U(0, 1)`` from the global torch generator (the one ``torch.manual_seed`` seeds, as for
``generate``): the same distribution as ``multinomial(softmax(s))``. ``generate`` calls
``torch.multinomial``, which cannot be captured in a CUDA graph (transformers notes it skips
cudagraphs); a uniform draw plus an argmax can, so the whole decode step, sampling included,
replays as one graph. For the same seed the draws differ from ``generate``'s, the distribution
does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingRule:
    """How a next token is picked; hashable, so a compiled step specialises on it."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off


def filter_scores(scores: torch.Tensor, rule: SamplingRule) -> torch.Tensor:
    """Temperature, top-k then top-p over float32 ``scores [B, V]``; filtered entries are ``-inf``."""
    if rule.temperature != 1.0:
        scores = scores / rule.temperature
    if rule.top_k > 0:
        k = min(rule.top_k, scores.shape[-1])
        kth = torch.topk(scores, k).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if rule.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - rule.top_p)
        drop[..., -1:] = False  # at least one token stays
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


def pick_tokens(logits: torch.Tensor, rule: SamplingRule) -> torch.Tensor:
    """The next token of each row, ``[B]`` long, from ``logits [B, V]`` (any float dtype)."""
    scores = logits.float()
    if not rule.do_sample:
        return torch.argmax(scores, dim=-1)
    scores = filter_scores(scores, rule)
    uniform = torch.rand_like(scores).clamp_(min=torch.finfo(torch.float32).tiny)
    gumbel = -torch.log(-torch.log(uniform))
    return torch.argmax(scores + gumbel, dim=-1)
