"""Prompt tuning (Lester et al.): trainable virtual token embeddings put before the input.

Config fields and the checkpoint (``prompt_embeddings``) follow ``peft``'s ``PromptTuningConfig``
and ``PromptEmbedding``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoTokenizer

from .config import register_config
from .constraints import param
from .virtual_tokens import PromptLearningConfig, VirtualTokenEncoder

_INIT_CHOICES = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@register_config
@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """``prompt_tuning_init``: ``"RANDOM"`` (N(0, 1)), ``"TEXT"`` (the word embeddings of
    ``prompt_tuning_init_text``, tokenized with ``tokenizer_name_or_path``, repeated or cut to
    length) or ``"SAMPLE_VOCAB"`` (embeddings of random vocabulary tokens).
    """

    PEFT_TYPE: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = param("RANDOM", choices=_INIT_CHOICES)
    prompt_tuning_init_text: str | None = param(None, nonblank=True)
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.prompt_tuning_init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)).upper()
        super().__post_init__()
        if self.prompt_tuning_init == "TEXT":
            if not self.tokenizer_name_or_path:
                raise ValueError("PromptTuningConfig: prompt_tuning_init='TEXT' needs tokenizer_name_or_path")
            if self.prompt_tuning_init_text is None:
                raise ValueError("PromptTuningConfig: prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        elif self.tokenizer_kwargs:
            raise ValueError("PromptTuningConfig: tokenizer_kwargs is only used with prompt_tuning_init='TEXT'")

    def init_token_ids(self) -> list[int]:
        """The token ids whose embeddings initialise a TEXT prompt (peft's tokenisation, repeated/cut)."""
        kwargs = dict(self.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)  # as peft: never run remote code for an init
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path, **kwargs)
        ids = list(tokenizer(self.prompt_tuning_init_text)["input_ids"])
        if not ids:
            raise ValueError("PromptTuningConfig: prompt_tuning_init_text tokenizes to nothing")
        total = self.total_virtual_tokens
        return (ids * math.ceil(total / len(ids)))[:total]

    def create_prompt_encoder(self, word_embeddings: nn.Module) -> PromptEmbedding:
        return PromptEmbedding(self, word_embeddings)


class PromptEmbedding(VirtualTokenEncoder):
    """``embedding``: ``(total_virtual_tokens, token_dim)``, the virtual tokens themselves."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__(config.total_virtual_tokens, int(config.token_dim))
        if config.inference_mode or config.prompt_tuning_init == "RANDOM":
            return
        weight = word_embeddings.weight
        if config.prompt_tuning_init == "TEXT":
            ids = torch.tensor(config.init_token_ids(), dtype=torch.long, device=weight.device)
        else:  # SAMPLE_VOCAB
            ids = torch.randint(0, weight.shape[0], (config.total_virtual_tokens,), device=weight.device)
        with torch.no_grad():
            self.embedding.weight.copy_(word_embeddings(ids).detach().to(torch.float32))
