"""LLaMA-Adapter (Zhang et al. 2023): learned adaption prompts with zero-initialised gating.

The top ``adapter_layers`` attention modules get ``adapter_len`` learned prompt vectors each. A
layer's queries attend to the prompt's keys/values *separately* from the sequence, and that extra
attention is scaled by a learned gate that starts at zero:

    ``out = Attn(x) + W_o (g * softmax(q K_p^T / sqrt(d)) V_p)``

with ``q`` the layer's rotary-embedded queries, ``K_p = k_proj(P)`` and ``V_p = v_proj(P)`` the
projected prompt ``P`` (no rotary embedding: the prompt has no position; grouped-query heads are
repeated as in the attention itself), and ``g`` a scalar per layer. With ``g = 0`` the model is
exactly the base model, whatever ``P`` is.

Config and checkpoint follow PEFT's ``AdaptionPromptConfig`` (``peft_type: "ADAPTION_PROMPT"``;
keys ``base_model.model.<layer path>.self_attn.adaption_prompt`` of shape ``(1, adapter_len,
hidden)`` and ``.adaption_gate`` of shape ``(1,)``), so files move both ways. One difference from
PEFT 0.21: PEFT passes the gated prompt attention through the whole ``o_proj`` module, adding its
bias a second time on models with ``attention_bias=True`` (and so changing them even at ``g = 0``);
here only ``W_o`` is applied. On Llama (no attention bias) the two agree exactly.

Supported: Llama-architecture attention (``q_proj``/``k_proj``/``v_proj``/``o_proj``, rotary
embeddings passed as ``position_embeddings``, as in transformers 5: Llama, Mistral, Qwen2).
Because the adapter wraps the whole attention module, weight-space adapters (LoRA, ...) cannot be
put *inside* an attention module that carries an adaption prompt, or the other way round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig, register_config
from .constraints import param
from .layer import AdapterLayer, UnmergeableAdapterLayer
from .routing import add_rows, take_rows
from .targeting import iter_modules, suffix_match, unwrap

DEFAULT_TARGET = "self_attn"
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# attention variants whose queries go through more than q_proj + RoPE (their query could not be recomputed)
_UNSUPPORTED_PARTS = ("q_norm", "k_norm", "q_a_proj", "kv_a_proj_with_mqa")


@register_config
@dataclass
class AdaptionPromptConfig(AdapterConfig):
    """PEFT's ``AdaptionPromptConfig``: ``adapter_len`` prompt vectors in each of the top
    ``adapter_layers`` modules named ``target_modules`` (a module name, ``"self_attn"`` by default).
    """

    PEFT_TYPE: ClassVar[str] = "ADAPTION_PROMPT"
    ADAPTER_PREFIX: ClassVar[str] = "adaption_"
    MERGEABLE: ClassVar[bool] = False

    target_modules: str | None = None
    adapter_len: int = param(10, gt=0)
    adapter_layers: int | None = param(None, gt=0, required=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_modules is not None and (not isinstance(self.target_modules, str) or not self.target_modules):
            raise ValueError(
                f"AdaptionPromptConfig: target_modules must be one module name such as 'self_attn', "
                f"got {self.target_modules!r}"
            )

    def find_target_modules(self, model: nn.Module) -> list[str]:
        """The last ``adapter_layers`` modules named ``target_modules``, in model order (PEFT's rule)."""
        if self.target_modules is None:
            self.target_modules = DEFAULT_TARGET
        found = [name for name, _ in iter_modules(model) if suffix_match(name, self.target_modules)]
        if not found:
            raise ValueError(f"AdaptionPromptConfig: target_modules: no module is named {self.target_modules!r}")
        if len(found) < self.adapter_layers:
            raise ValueError(
                f"AdaptionPromptConfig: adapter_layers={self.adapter_layers} but the model has only {len(found)} "
                f"{self.target_modules!r} modules"
            )
        return found[-self.adapter_layers :]

    def create_layer(self, target: nn.Module, adapter_name: str, module_name: str) -> AdapterLayer:
        layer = AdaptedAttention(target, module_name)
        self.update_layer(layer, adapter_name, module_name)
        return layer

    def update_layer(self, layer: AdapterLayer, adapter_name: str, module_name: str) -> None:
        if not isinstance(layer, AdaptedAttention):
            raise TypeError(f"{module_name!r} is wrapped by {type(layer).__name__}, not an adaption-prompt layer")
        layer.add_adapter(adapter_name, int(self.adapter_len))

    def layer_class(self) -> type[AdapterLayer]:
        return AdaptedAttention


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AdaptedAttention(UnmergeableAdapterLayer):
    """A Llama-style attention module plus gated adaption prompts (one per adapter name)."""

    adapter_layer_names: ClassVar[tuple[str, ...]] = ("adaption_prompt", "adaption_gate")

    def __init__(self, base_layer: nn.Module, module_name: str = "attention") -> None:
        missing = [p for p in _PROJECTIONS if not isinstance(getattr(base_layer, p, None), nn.Module)]
        if missing or not hasattr(base_layer, "head_dim") or not hasattr(base_layer, "config"):
            raise TypeError(
                f"LLaMA-Adapter needs a Llama-style attention module (q_proj, k_proj, v_proj, o_proj, head_dim, "
                f"config); {module_name!r} is {type(base_layer).__name__}"
                + (f" without {', '.join(missing)}" if missing else "")
            )
        odd = [p for p in _UNSUPPORTED_PARTS if hasattr(base_layer, p)]
        if odd:
            raise TypeError(
                f"LLaMA-Adapter cannot recompute the queries of {type(base_layer).__name__} ({module_name!r} has {odd[0]})"
            )
        nested = [n for n, m in base_layer.named_modules() if isinstance(m, AdapterLayer)]
        if nested:
            raise TypeError(
                f"{module_name!r} already holds adapter layers ({nested[0]}); LLaMA-Adapter wraps the whole attention "
                "module and cannot be combined with adapters inside it"
            )
        super().__init__(base_layer)
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()
        config = base_layer.config
        self.hidden_size = int(config.hidden_size)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(base_layer.head_dim)

    def add_adapter(self, adapter_name: str, adapter_len: int) -> None:
        if adapter_name in self.adapter_names:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer")
        weight = unwrap(self.base_layer.q_proj).weight
        kw: dict[str, Any] = {
            "device": weight.device,
            "dtype": weight.dtype if weight.dtype.is_floating_point else torch.float32,
        }
        # the official implementation and PEFT draw the prompt from N(0, 1); the gate starts closed
        self.adaption_prompt[adapter_name] = nn.Parameter(torch.randn(1, adapter_len, self.hidden_size, **kw))
        self.adaption_gate[adapter_name] = nn.Parameter(torch.zeros(1, **kw))
        if adapter_name not in self.active_adapters:  # inactive (and frozen) until set_adapter, as in PEFT
            self.adaption_prompt[adapter_name].requires_grad_(False)
            self.adaption_gate[adapter_name].requires_grad_(False)
        self._refresh()

    # ------------------------------------------------------------------ math
    def _queries(self, hidden_states: torch.Tensor, position_embeddings: Any) -> torch.Tensor:
        """The layer's rotary-embedded queries ``(batch, heads, seq, head_dim)`` (attention does not return them)."""
        batch, seq, _ = hidden_states.shape
        q = self.base_layer.q_proj(hidden_states).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        if position_embeddings is None:
            raise ValueError("LLaMA-Adapter needs the rotary position_embeddings (cos, sin) the decoder layer passes")
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin

    def _prompt_kv(self, adapter_name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the prompt, ``(1, heads, adapter_len, head_dim)`` (kv heads repeated)."""
        prompt = self.adaption_prompt[adapter_name]
        attn = self.base_layer
        proj_dtype = unwrap(attn.k_proj).weight.dtype
        if proj_dtype.is_floating_point and prompt.dtype != proj_dtype:
            prompt = prompt.to(proj_dtype)
        length = prompt.shape[1]
        key = attn.k_proj(prompt).view(1, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        value = attn.v_proj(prompt).view(1, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        return key.to(dtype), value.to(dtype)

    def prompt_attention(self, adapter_name: str, query: torch.Tensor) -> torch.Tensor:
        """``g * softmax(q K_p^T / sqrt(d)) V_p`` with heads merged: ``(batch, seq, heads * head_dim)``."""
        key, value = self._prompt_kv(adapter_name, query.dtype)
        scores = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(self.head_dim)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        probs = self.adaption_gate[adapter_name].to(query.dtype) * probs
        out = torch.matmul(probs, value)  # (batch, heads, seq, head_dim)
        batch, _, seq, _ = out.shape
        return out.transpose(1, 2).reshape(batch, seq, -1)

    def _project_out(self, merged_heads: torch.Tensor) -> torch.Tensor:
        """``W_o`` applied without ``o_proj``'s bias (the bias is already in the attention output)."""
        o_proj = self.base_layer.o_proj
        out = o_proj(merged_heads)
        bias = getattr(unwrap(o_proj), "bias", None)
        return out if bias is None else out - bias.to(out.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.base_layer(*args, **kwargs)
        if self.disable_adapters or (not self._forward_adapters and self._routing is None):
            return outputs
        if kwargs.get("output_attentions"):
            raise ValueError("LLaMA-Adapter does not report attention weights; call without output_attentions")
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        position_embeddings = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        attn_output, *rest = outputs if isinstance(outputs, tuple) else (outputs,)
        query = self._queries(hidden_states, position_embeddings)
        if self._routing is not None:  # mixed-adapter batch: each row group attends to its own prompt
            held = set(self.adapter_names)
            for name, rows in self._routing.groups(query.shape[0], query.device):
                if name in held:
                    delta = self._project_out(self.prompt_attention(name, take_rows(query, rows)))
                    attn_output = add_rows(attn_output, rows, delta)
            return (attn_output, *rest) if isinstance(outputs, tuple) else attn_output
        for name in self._forward_adapters:
            delta = self._project_out(self.prompt_attention(name, query))
            attn_output = attn_output + delta.to(attn_output.dtype)
        return (attn_output, *rest) if isinstance(outputs, tuple) else attn_output
