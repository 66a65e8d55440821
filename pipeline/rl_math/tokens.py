"""Per-token quantities read off a causal LM's output: last real position, log-probs, entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding position of each row (works for left or right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` in float32, or float64 when they are: the precision a softmax is taken in."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[..., token]`` for each position (at least float32 for a stable
    softmax; float64 logits stay float64)."""
    logp = F.log_softmax(at_least_float32(logits), dim=-1)
    return torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position, in nats."""
    logp = F.log_softmax(at_least_float32(logits), dim=-1)
    return -(logp.exp() * logp).sum(-1)
