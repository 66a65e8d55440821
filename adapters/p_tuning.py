"""P-tuning (Liu et al.): virtual token embeddings produced by a small MLP or LSTM+MLP encoder.

Config fields and module names (``embedding``, ``mlp_head``, ``lstm_head``) follow ``peft``'s
``PromptEncoderConfig`` / ``PromptEncoder``. The checkpoint stores only the encoder's output
(``prompt_embeddings``), as peft does; a loaded adapter uses those embeddings directly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .config import register_config
from .constraints import param
from .virtual_tokens import PromptLearningConfig, VirtualTokenEncoder

_ENCODER_TYPES = ("MLP", "LSTM")
_MLP_LAYERS = 2


@register_config
@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """``encoder_reparameterization_type``: ``"MLP"`` (3 linear layers; ``encoder_num_layers`` is
    ignored, as in peft) or ``"LSTM"`` (bidirectional LSTM with ``encoder_num_layers`` layers and
    ``encoder_dropout``, then a 2-layer MLP). ``encoder_hidden_size`` defaults to ``token_dim``.
    """

    PEFT_TYPE: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = param("MLP", choices=_ENCODER_TYPES)
    encoder_hidden_size: int | None = param(None, gt=0)
    encoder_num_layers: int = param(_MLP_LAYERS, gt=0)
    encoder_dropout: float = param(0.0, ge=0.0, lt=1.0)

    def __post_init__(self) -> None:
        kind = self.encoder_reparameterization_type
        self.encoder_reparameterization_type = str(getattr(kind, "value", kind)).upper()
        super().__post_init__()

    def create_prompt_encoder(self, word_embeddings: nn.Module) -> PromptEncoder:
        return PromptEncoder(self)


class PromptEncoder(VirtualTokenEncoder):
    """``embedding`` -> (``lstm_head`` ->) ``mlp_head``; heads are absent in inference mode."""

    def __init__(self, config: PromptEncoderConfig) -> None:
        token_dim = int(config.token_dim)
        super().__init__(config.total_virtual_tokens, token_dim)
        self.encoder_type = config.encoder_reparameterization_type
        if config.inference_mode:
            return
        hidden = int(config.encoder_hidden_size or token_dim)
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(
                input_size=token_dim,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(
                nn.Linear(hidden * 2, hidden * 2), nn.ReLU(), nn.Linear(hidden * 2, token_dim)
            )
        else:
            if config.encoder_num_layers != _MLP_LAYERS:
                warnings.warn(
                    f"PromptEncoderConfig: encoder_num_layers is ignored for MLP; exactly {_MLP_LAYERS} hidden "
                    "layers are used",
                    stacklevel=2,
                )
            self.mlp_head = nn.Sequential(
                nn.Linear(token_dim, hidden), nn.ReLU(),
                nn.Linear(hidden, hidden), nn.ReLU(),
                nn.Linear(hidden, token_dim),
            )

    @property
    def has_head(self) -> bool:
        return "mlp_head" in self._modules

    def _apply_head(self, embeddings: torch.Tensor) -> torch.Tensor:
        if "lstm_head" in self._modules:
            embeddings = self.lstm_head(embeddings)[0]
        return self.mlp_head(embeddings)

    def _drop_head(self) -> None:
        for name in ("lstm_head", "mlp_head"):
            if name in self._modules:
                delattr(self, name)
