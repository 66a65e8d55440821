"""Shared machinery of the virtual-token methods: prompt tuning, P-tuning and prefix tuning.

These methods leave the model's weights alone. A small *prompt encoder* (held by
:class:`~adapters.model.AdapterModel` in ``prompt_encoder[<adapter name>]``, PEFT's layout) produces
either

* ``num_virtual_tokens`` embeddings that are put in front of the input embeddings (prompt tuning,
  P-tuning), or
* a key/value prefix for every attention layer that seeds the KV cache (prefix tuning).

Behaviour matched to ``peft`` 0.21 so that adapters and logits interoperate:

* Positions: virtual tokens take positions ``0 .. n-1`` and real tokens start at ``n`` (for prefix
  tuning too: the prefix occupies the first ``n`` cache slots). In ``generate`` positions are
  computed from the (padding-aware) attention mask, so left-padded rows match unpadded ones.
* Seq2seq prompt tuning/P-tuning only feeds the first ``n`` virtual tokens to the encoder (the
  prompt embedding still has ``2 n`` rows); prefix tuning only seeds the decoder's self-attention.
* The file holds only ``prompt_embeddings``: the encoder's *output* (P-tuning's MLP/LSTM head and
  prefix tuning's projection are applied before saving and are not stored). A loaded adapter
  therefore uses its embedding directly ("collapsed" encoder).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from .config import AdapterConfig
from .constraints import param
from .task_types import TaskType

PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"
SUPPORTED_TASKS: tuple[str, ...] = (TaskType.CAUSAL_LM, TaskType.SEQ_2_SEQ_LM)


@dataclass
class PromptLearningConfig(AdapterConfig):
    """Fields shared by the virtual-token methods (PEFT's ``PromptLearningConfig``).

    ``token_dim``, ``num_transformer_submodules``, ``num_attention_heads`` and ``num_layers`` are
    filled from the model's config when the adapter is added (see :meth:`prepare_for_model`).
    """

    # True for methods that act on the KV cache (prefix tuning) instead of the input embeddings.
    INJECTS_CACHE: ClassVar[bool] = False

    num_virtual_tokens: int | None = param(None, gt=0, required=True)
    token_dim: int | None = param(None, gt=0)
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = param(None, gt=0)
    num_layers: int | None = param(None, gt=0)
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        if self.task_type is not None and self.task_type not in SUPPORTED_TASKS:
            raise ValueError(
                f"{name}: task_type {self.task_type!r} is not supported; use one of {', '.join(SUPPORTED_TASKS)}"
            )
        if self.modules_to_save:
            raise ValueError(f"{name}: modules_to_save is not supported for virtual-token adapters")
        if self.num_transformer_submodules not in (None, 1, 2):
            raise ValueError(f"{name}: num_transformer_submodules must be 1 or 2, got {self.num_transformer_submodules!r}")

    @property
    def is_prompt_learning(self) -> bool:
        return True

    @property
    def total_virtual_tokens(self) -> int:
        """Rows of the prompt embedding: one set of virtual tokens per transformer submodule."""
        return int(self.num_virtual_tokens) * int(self.num_transformer_submodules or 1)

    # ------------------------------------------------------------------ sizing from the model
    def prepare_for_model(self, model: nn.Module) -> None:
        """Fill the unset model-derived fields the way ``peft`` 0.21 does (``_prepare_prompt_learning_config``).

        For prefix tuning on grouped-query-attention models (config has ``num_key_value_heads``)
        the prefix is sized for the key/value heads: ``token_dim = head_dim * num_key_value_heads``
        and ``num_attention_heads = num_key_value_heads``.
        """
        model_config = getattr(model, "config", None)
        if model_config is None:
            raise ValueError(f"{type(self).__name__}: the model has no .config to size the virtual tokens from")
        if self.task_type is None:
            is_enc_dec = bool(getattr(model_config, "is_encoder_decoder", False))
            self.task_type = TaskType.SEQ_2_SEQ_LM if is_enc_dec else TaskType.CAUSAL_LM
        if self.num_transformer_submodules is None:
            self.num_transformer_submodules = 2 if self.task_type == TaskType.SEQ_2_SEQ_LM else 1

        cfg = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(vars(model_config))
        if "text_config" in cfg and isinstance(cfg["text_config"], dict):
            cfg = cfg["text_config"]

        def first(keys: tuple[str, ...], what: str) -> int:
            for key in keys:
                if cfg.get(key) is not None:
                    return int(cfg[key])
            raise ValueError(f"{type(self).__name__}: cannot infer {what} from the model config; set it explicitly")

        if self.num_layers is None:
            layers = getattr(model_config, "num_hidden_layers", None)
            self.num_layers = int(layers) if layers is not None else first(("num_layers", "n_layer"), "num_layers")
        if self.token_dim is None:
            self.token_dim = first(("hidden_size", "n_embd", "d_model"), "token_dim")
        if self.num_attention_heads is None:
            self.num_attention_heads = first(
                ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"), "num_attention_heads"
            )
        if self.INJECTS_CACHE and "num_key_value_heads" in cfg:
            head_dim = cfg.get("head_dim") or self.token_dim // self.num_attention_heads
            kv_heads = int(cfg["num_key_value_heads"])
            self.token_dim = int(head_dim) * kv_heads
            self.num_attention_heads = kv_heads
        if hasattr(self, "encoder_hidden_size") and getattr(self, "encoder_hidden_size") is None:
            setattr(self, "encoder_hidden_size", self.token_dim)

    # ------------------------------------------------------------------ method hook
    def create_prompt_encoder(self, word_embeddings: nn.Module) -> VirtualTokenEncoder:
        """Build this method's prompt encoder (config already prepared for the model)."""
        raise NotImplementedError


class VirtualTokenEncoder(nn.Module):
    """Base prompt encoder: an ``embedding`` table plus an optional reparameterisation head.

    :meth:`output` is what the model consumes (and what the file stores). Once *collapsed*
    (loaded from a file, or built with ``inference_mode``) the embedding rows are the output.
    """

    def __init__(self, rows: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, width)

    # Subclasses with a head override these two.
    @property
    def has_head(self) -> bool:
        return False

    def _apply_head(self, embeddings: torch.Tensor) -> torch.Tensor:  # (1, rows, width) -> (1, rows, out)
        return embeddings

    def _drop_head(self) -> None:
        pass

    def output(self) -> torch.Tensor:
        """The virtual-token values, shape ``(rows, out_width)`` (differentiable)."""
        weight = self.embedding.weight
        if not self.has_head:
            return weight
        return self._apply_head(weight.unsqueeze(0))[0]

    def prompts(self, batch_size: int, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``(batch, rows, out_width)`` virtual tokens for a batch: the same for every row here;
        multitask prompt tuning picks each row's prompt by its ``task_ids`` entry."""
        return self.output().unsqueeze(0).expand(batch_size, -1, -1)

    def collapse(self) -> None:
        """Replace embedding + head by one embedding holding the head's output (PEFT's inference layout)."""
        if not self.has_head:
            return
        with torch.no_grad():
            value = self.output().detach().clone()
        trainable = self.embedding.weight.requires_grad
        self._drop_head()
        self.embedding = nn.Embedding(value.shape[0], value.shape[1], device=value.device, dtype=value.dtype)
        with torch.no_grad():
            self.embedding.weight.copy_(value)
        self.embedding.weight.requires_grad_(trainable)

    def saved_state(self) -> dict[str, torch.Tensor]:
        """PEFT's checkpoint content: ``{"prompt_embeddings": output}`` as a detached CPU copy."""
        with torch.no_grad():
            value = self.output().detach().to("cpu", copy=True).contiguous()
        return {PROMPT_EMBEDDINGS_KEY: value}

    def load_saved(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        """Load ``prompt_embeddings`` (collapsing a head first); return the keys that were ignored."""
        if PROMPT_EMBEDDINGS_KEY not in state_dict:
            raise ValueError(f"checkpoint lacks {PROMPT_EMBEDDINGS_KEY!r} (has {sorted(state_dict)[:5]})")
        value = state_dict[PROMPT_EMBEDDINGS_KEY]
        self.collapse()
        target = self.embedding.weight
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"adapter for a different base? {PROMPT_EMBEDDINGS_KEY}: saved {tuple(value.shape)} "
                f"vs model {tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(value.to(device=target.device, dtype=target.dtype))
        return [k for k in state_dict if k != PROMPT_EMBEDDINGS_KEY]


# ---------------------------------------------------------------------- tensors for the model
def _model_dtype(model: nn.Module) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def prompt_embeddings(
    config: PromptLearningConfig,
    encoder: VirtualTokenEncoder,
    batch_size: int,
    dtype: torch.dtype,
    task_ids: torch.Tensor | None = None,
):
    """``(batch, num_virtual_tokens, token_dim)`` virtual embeddings put before the inputs."""
    return encoder.prompts(batch_size, task_ids)[:, : config.num_virtual_tokens].to(dtype)


def prefix_key_values(
    config: PromptLearningConfig, encoder: VirtualTokenEncoder, batch_size: int, dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(key, value)`` of shape ``(batch, heads, num_virtual_tokens, head_dim)``.

    Replicates peft's ``get_prompt`` reshaping exactly, including its seq2seq layout (the flat
    prefix is duplicated and regrouped in fours, so decoder layer ``j`` gets flat pair ``2j mod L``).
    """
    nvt, heads, layers = config.num_virtual_tokens, config.num_attention_heads, config.num_layers
    subs = config.num_transformer_submodules or 1
    flat = encoder.output()[:nvt].to(dtype)
    kv = flat.unsqueeze(0).expand(batch_size, -1, -1).reshape(batch_size, nvt, layers * 2, heads, config.token_dim // heads)
    if subs == 2:
        kv = torch.cat([kv, kv], dim=2)
    chunks = kv.permute(2, 0, 3, 1, 4).split(subs * 2)
    return [(chunk[0].contiguous(), chunk[1].contiguous()) for chunk in chunks]


def _fill(cache: Any, key_values: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for layer_idx, (key, value) in enumerate(key_values):
        cache.update(key, value, layer_idx)


def new_prefix_cache(model: nn.Module, config: PromptLearningConfig, encoder: VirtualTokenEncoder, batch_size: int):
    """A fresh ``DynamicCache`` (``EncoderDecoderCache`` for seq2seq) holding the prefix."""
    key_values = prefix_key_values(config, encoder, batch_size, _model_dtype(model))
    if _is_encoder_decoder(model):
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        _fill(cache.self_attention_cache, key_values)
        return cache
    cache = DynamicCache(config=model.config)
    _fill(cache, key_values)
    return cache


def seed_prefix_cache(
    model: nn.Module, config: PromptLearningConfig, encoder: VirtualTokenEncoder, cache: Any, batch_size: int
):
    """Write the prefix into an empty generation cache in place (or build one when there is none)."""
    if cache is None:
        return new_prefix_cache(model, config, encoder, batch_size)
    target = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    if not isinstance(target, DynamicCache):
        raise ValueError(
            f"prefix tuning needs a DynamicCache during generation, got {type(target).__name__}; "
            "use the default cache_implementation"
        )
    _fill(target, prefix_key_values(config, encoder, batch_size, _model_dtype(model)))
    return cache


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _cache_length(cache: Any) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


_CACHE_NAMES = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def _forward_cache_name(forward_type: type) -> str:
    try:
        params = inspect.signature(forward_type.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_name(model: nn.Module) -> str:
    """The KV cache's keyword in ``model``'s forward: ``cache`` from transformers 5.24 on (where
    ``past_key_values`` is a deprecated alias, to be removed in 5.40), ``past_key_values`` before."""
    return _forward_cache_name(type(model))


def _given_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a caller or ``prepare_inputs_for_generation`` passed, under either name."""
    for name in _CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _inputs_cache_name(model: nn.Module, inputs: dict[str, Any]) -> str:
    """The name ``prepare_inputs_for_generation`` used (it decides what reaches the forward)."""
    for name in _CACHE_NAMES:
        if name in inputs:
            return name
    return cache_name(model)


def _ones(reference: torch.Tensor, batch_size: int, n: int) -> torch.Tensor:
    return torch.ones(batch_size, n, dtype=reference.dtype, device=reference.device)


def _extend_mask(mask: Any, batch_size: int, n: int) -> Any:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError("virtual-token adapters need a 2D attention mask (batch, sequence)")
    return torch.cat((_ones(mask, batch_size, n), mask), dim=1)


def _prompt_positions(position_ids: torch.Tensor, n: int) -> torch.Tensor:
    """Virtual tokens at ``0..n-1``, real tokens shifted by ``n``."""
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    virtual = torch.arange(n, dtype=position_ids.dtype, device=position_ids.device)
    virtual = virtual.unsqueeze(0).expand(position_ids.shape[0], -1)
    return torch.cat((virtual, position_ids + n), dim=-1)


def _batch_size(input_ids: Any, inputs_embeds: Any) -> int:
    if input_ids is not None:
        return int(input_ids.shape[0])
    if inputs_embeds is not None:
        return int(inputs_embeds.shape[0])
    raise ValueError("pass input_ids or inputs_embeds")


def _drop_token_type_ids(kwargs: dict[str, Any]) -> None:
    if kwargs.pop("token_type_ids", None) is not None:
        warnings.warn("token_type_ids are not supported with virtual-token adapters; ignoring them", stacklevel=3)


# ---------------------------------------------------------------------- forward
def virtual_forward(
    model: nn.Module, config: PromptLearningConfig, encoder: VirtualTokenEncoder, *args: Any, **kwargs: Any
) -> Any:
    """Run ``model`` with the virtual tokens of ``encoder`` (a fresh sequence; caching is for ``generate``)."""
    if args:
        if len(args) > 1 or "input_ids" in kwargs:
            raise TypeError("with a virtual-token adapter pass model inputs as keywords (input_ids=..., ...)")
        kwargs["input_ids"] = args[0]
    if _cache_length(_given_cache(kwargs)) > 0:
        raise ValueError("virtual-token adapters prepend their tokens to a fresh sequence; use generate() for caching")
    for name in _CACHE_NAMES:
        kwargs.pop(name, None)
    _drop_token_type_ids(kwargs)
    task_ids = kwargs.pop("task_ids", None)  # multitask prompt tuning: one task per row
    if _is_encoder_decoder(model):
        return _seq2seq_forward(model, config, encoder, task_ids=task_ids, **kwargs)
    return _causal_forward(model, config, encoder, task_ids=task_ids, **kwargs)


def _causal_forward(model, config, encoder, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                    position_ids=None, task_ids=None, **kwargs):
    n = config.num_virtual_tokens
    batch = _batch_size(input_ids, inputs_embeds)
    attention_mask = _extend_mask(attention_mask, batch, n)
    if config.INJECTS_CACHE:
        if position_ids is not None:
            position_ids = position_ids + n
        cache = new_prefix_cache(model, config, encoder, batch)
        kwargs[cache_name(model)] = cache
        return model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                     position_ids=position_ids, **kwargs)
    if inputs_embeds is None:
        inputs_embeds = model.get_input_embeddings()(input_ids)
    prompts = prompt_embeddings(config, encoder, batch, inputs_embeds.dtype, task_ids)
    inputs_embeds = torch.cat((prompts, inputs_embeds), dim=1)
    if labels is not None:
        labels = torch.cat((torch.full((batch, n), -100, dtype=labels.dtype, device=labels.device), labels), dim=1)
    if position_ids is not None:
        position_ids = _prompt_positions(position_ids, n)
    return model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, position_ids=position_ids,
                 **kwargs)


def _seq2seq_forward(model, config, encoder, input_ids=None, attention_mask=None, inputs_embeds=None,
                     decoder_attention_mask=None, task_ids=None, **kwargs):
    n = config.num_virtual_tokens
    batch = _batch_size(input_ids, inputs_embeds)
    if config.INJECTS_CACHE:
        decoder_attention_mask = _extend_mask(decoder_attention_mask, batch, n)
        cache = new_prefix_cache(model, config, encoder, batch)
        kwargs[cache_name(model)] = cache
        return model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                     decoder_attention_mask=decoder_attention_mask, **kwargs)
    if inputs_embeds is None:
        inputs_embeds = model.get_input_embeddings()(input_ids)
    prompts = prompt_embeddings(config, encoder, batch, inputs_embeds.dtype, task_ids)
    inputs_embeds = torch.cat((prompts, inputs_embeds), dim=1)
    attention_mask = _extend_mask(attention_mask, batch, n)
    return model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                 decoder_attention_mask=decoder_attention_mask, **kwargs)


# ---------------------------------------------------------------------- generate
def virtual_generate(
    model: nn.Module, config: PromptLearningConfig, encoder: VirtualTokenEncoder, *args: Any, **kwargs: Any
) -> Any:
    """``model.generate`` with the virtual tokens: injected at the prefill step, kept by the KV cache."""
    if _given_cache(kwargs) is not None:
        raise ValueError("generate() with a virtual-token adapter starts from a fresh cache; do not pass a cache "
                         "(cache / past_key_values)")
    _drop_token_type_ids(kwargs)
    task_ids = kwargs.pop("task_ids", None)
    if _is_encoder_decoder(model) and not config.INJECTS_CACHE:
        # The encoder runs once: hand it [virtual; input] embeddings.
        input_ids = kwargs.pop("input_ids", None)
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None and args:
            input_ids, args = args[0], args[1:]
        if input_ids is None:
            raise ValueError("generate() with a virtual-token adapter needs input_ids")
        embeds = model.get_input_embeddings()(input_ids)
        batch = embeds.shape[0]
        prompts = prompt_embeddings(config, encoder, batch, embeds.dtype, task_ids)
        kwargs["inputs_embeds"] = torch.cat((prompts, embeds), dim=1)
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = _extend_mask(kwargs["attention_mask"], batch, config.num_virtual_tokens)
        return model.generate(*args, **kwargs)

    original = model.prepare_inputs_for_generation
    had_instance_attr = "prepare_inputs_for_generation" in vars(model)
    prepare = _CausalPrepare(model, config, encoder, original, task_ids)
    if _is_encoder_decoder(model):
        prepare = _Seq2SeqPrefixPrepare(model, config, encoder, original)
    model.prepare_inputs_for_generation = prepare
    try:
        return model.generate(*args, **kwargs)
    finally:
        if had_instance_attr:
            model.prepare_inputs_for_generation = original
        else:
            del model.prepare_inputs_for_generation


class _Prepare:
    def __init__(self, model, config, encoder, original, task_ids=None) -> None:
        self.model, self.config, self.encoder, self.original = model, config, encoder, original
        self.task_ids = task_ids

    def _task_ids_for(self, batch: int) -> torch.Tensor | None:
        """``task_ids`` per row of what is fed: beam search / num_return_sequences repeat each row."""
        ids = self.task_ids
        if ids is None or not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.shape[0] in (0, batch):
            return ids
        if batch % ids.shape[0]:
            raise ValueError(f"task_ids has {ids.shape[0]} entries for a generation batch of {batch} rows")
        return ids.repeat_interleave(batch // ids.shape[0])

    def _fresh(self, inputs: dict[str, Any], cache: Any) -> bool:
        return inputs.get("use_cache") is False or _cache_length(cache) == 0

    @staticmethod
    def _fix_cache_position(inputs: dict[str, Any], self_cache: Any, fed: torch.Tensor) -> dict[str, Any]:
        """Older transformers pass ``cache_position``: recompute it for the sequence actually fed."""
        if inputs.get("cache_position") is not None:
            past = _cache_length(self_cache)
            inputs["cache_position"] = torch.arange(past, past + fed.shape[1], device=fed.device)
        return inputs


class _CausalPrepare(_Prepare):
    """Wraps the model's ``prepare_inputs_for_generation``: virtual tokens at prefill, shifted positions."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = self.original(*args, **kwargs)
        n = self.config.num_virtual_tokens
        key = _inputs_cache_name(self.model, inputs)
        cache = inputs.get(key)
        fresh = self._fresh(inputs, cache)
        reference = inputs.get("input_ids")
        if reference is None:
            reference = inputs["inputs_embeds"]
        batch = int(reference.shape[0])
        inputs["attention_mask"] = _extend_mask(inputs.get("attention_mask"), batch, n)
        positions = inputs.get("position_ids")
        if self.config.INJECTS_CACHE:
            if fresh:
                if inputs.get("use_cache") is False:
                    cache = None  # the model hands its cache back even without use_cache; never reuse it
                inputs[key] = seed_prefix_cache(self.model, self.config, self.encoder, cache, batch)
            if positions is not None:
                inputs["position_ids"] = positions + n
            fed = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
            return self._fix_cache_position(inputs, inputs[key], fed)
        if fresh:
            if inputs.get("use_cache") is False:
                inputs[key] = None
            embeds = inputs.get("inputs_embeds")
            if embeds is None:
                embeds = self.model.get_input_embeddings()(inputs["input_ids"])
            prompts = prompt_embeddings(self.config, self.encoder, batch, embeds.dtype, self._task_ids_for(batch))
            inputs["inputs_embeds"] = torch.cat((prompts, embeds), dim=1)
            inputs["input_ids"] = None
            if positions is not None:
                inputs["position_ids"] = _prompt_positions(positions, n)
        elif positions is not None:
            inputs["position_ids"] = positions + n
        fed = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
        return self._fix_cache_position(inputs, inputs.get(key), fed)


class _Seq2SeqPrefixPrepare(_Prepare):
    """Seeds the decoder's self-attention cache with the prefix at the first decoder step."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = self.original(*args, **kwargs)
        n = self.config.num_virtual_tokens
        key = _inputs_cache_name(self.model, inputs)
        cache = inputs.get(key)
        self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        batch = int(inputs["decoder_input_ids"].shape[0])
        if inputs.get("use_cache") is False or _cache_length(self_cache) == 0:
            if inputs.get("use_cache") is False or cache is None:
                cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            inputs[key] = seed_prefix_cache(self.model, self.config, self.encoder, cache, batch)
        inputs["decoder_attention_mask"] = _extend_mask(inputs.get("decoder_attention_mask"), batch, n)
        self_cache = inputs[key].self_attention_cache
        return self._fix_cache_position(inputs, self_cache, inputs["decoder_input_ids"])
