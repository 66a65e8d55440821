"""Prefix tuning (Li & Liang): a trainable key/value prefix for every attention layer.

The prefix seeds the model's KV cache (a ``transformers.DynamicCache``; ``EncoderDecoderCache``
for seq2seq, where only the decoder self-attention gets it, as in peft). Config fields and module
names (``embedding``, ``transform``) follow ``peft``'s ``PrefixTuningConfig`` / ``PrefixEncoder``;
the checkpoint stores the flattened prefix as ``prompt_embeddings``.

For grouped-query attention the prefix is sized for the key/value heads (``token_dim`` becomes
``head_dim * num_key_value_heads``), which is what peft 0.21 does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .config import register_config
from .constraints import param
from .virtual_tokens import PromptLearningConfig, VirtualTokenEncoder


@register_config
@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """``prefix_projection``: learn ``num_virtual_tokens`` vectors of ``token_dim`` and map them to the
    prefix with a 2-layer MLP of width ``encoder_hidden_size``; otherwise learn the prefix directly.
    ``init_weights="zero"`` starts from an all-zero prefix.
    """

    PEFT_TYPE: ClassVar[str] = "PREFIX_TUNING"
    INJECTS_CACHE: ClassVar[bool] = True

    encoder_hidden_size: int | None = param(None, gt=0)
    prefix_projection: bool = False
    init_weights: str | None = param(None, choices=(None, "zero"))

    def create_prompt_encoder(self, word_embeddings: nn.Module) -> PrefixEncoder:
        return PrefixEncoder(self)


class PrefixEncoder(VirtualTokenEncoder):
    """Output ``(num_virtual_tokens, num_layers * 2 * token_dim)``: keys and values of every layer."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        token_dim, layers = int(config.token_dim), int(config.num_layers)
        flat = layers * 2 * token_dim
        project = config.prefix_projection and not config.inference_mode
        super().__init__(int(config.num_virtual_tokens), token_dim if project else flat)
        if project:
            hidden = int(config.encoder_hidden_size or token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, flat))
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        elif config.init_weights == "zero":
            nn.init.zeros_(self.embedding.weight)

    @property
    def has_head(self) -> bool:
        return "transform" in self._modules

    def _apply_head(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.transform(embeddings)

    def _drop_head(self) -> None:
        if "transform" in self._modules:
            delattr(self, "transform")
