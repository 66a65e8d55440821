"""``LoraEmbedding``: LoRA (and DoRA) around ``nn.Embedding``."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import dora
from .layer import LoraLayer


class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding``: ``A`` is (r, num_embeddings), ``B`` is (embedding_dim, r).

    Looking up rows of ``A^T`` replaces the one-hot product, so the update costs an (r x dim)
    matmul per token. Dropout is not applied to token ids (as in PEFT). For DoRA the "output"
    axis is the embedding dimension: ``m`` has ``embedding_dim`` entries.
    """

    adapter_layer_names: ClassVar[tuple[str, ...]] = (
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
    )
    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.in_features = int(base_layer.num_embeddings)
        self.out_features = int(base_layer.embedding_dim)

    def _create_tensors(self, adapter_name: str, r: int, init: bool | str) -> None:
        kw = self._factory_kwargs()
        weight_a = torch.empty(r, self.in_features, **kw)
        weight_b = torch.empty(self.out_features, r, **kw)
        if init is False:
            nn.init.normal_(weight_a)
            nn.init.normal_(weight_b)
        else:  # True and "gaussian": A zero, B normal (nn.Embedding's own init)
            nn.init.zeros_(weight_a)
            nn.init.normal_(weight_b)
        self.lora_embedding_A[adapter_name] = nn.Parameter(weight_a)
        self.lora_embedding_B[adapter_name] = nn.Parameter(weight_b)

    def _lora_pair(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def _weight_oi(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T

    def _embed_scale(self) -> torch.Tensor | float | None:
        scale = getattr(self.base_layer, "embed_scale", None)
        if isinstance(scale, torch.Tensor) and scale.numel() != 1:
            return None
        return scale

    def _embed(self, ids: torch.Tensor, table: torch.Tensor, scale: torch.Tensor | float | None) -> torch.Tensor:
        """Look ``ids`` up in ``table`` with the base embedding's options (and its scale if given)."""
        base = self.base_layer
        out = F.embedding(
            ids,
            table,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )
        if scale is not None:
            out = out * (scale.to(out.dtype) if isinstance(scale, torch.Tensor) else scale)
        return out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self._routing is not None:
            return self._grouped_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if not self._forward_adapters:
            return result
        base = self.base_layer
        base_out = result
        scale = self._embed_scale()
        for name in self._forward_adapters:
            delta = self._embed(x, self.lora_embedding_A[name].T, None) @ self.lora_embedding_B[name].T
            if scale is not None:
                delta = delta * (scale.to(delta.dtype) if isinstance(scale, torch.Tensor) else scale)
            if name in self.lora_magnitude_vector:
                weight = self._weight_oi(base.weight)
                plain = base_out
                if self.merged_adapters:  # DoRA's W is the one before other adapters were merged
                    weight = self._unmerged_weight_oi(weight)
                    plain = self._embed(x, weight.T.to(base_out.dtype), scale)
                weight = weight.to(delta.dtype)
                factor = self._dora_factor(name, weight)
                delta = dora.output_delta(factor, plain, delta * self.scaling[name])
                result = result + delta.to(result.dtype)
                continue
            if delta.dtype != result.dtype:
                delta = delta.to(result.dtype)
            result = torch.add(result, delta, alpha=self.scaling[name])
        return result
