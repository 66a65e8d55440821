"""``AdapterModel``: a transformers model with named adapters, exposing PEFT's ``PeftModel`` API.

The wrapped model sits at ``self.base_model.model`` (as in PEFT), so ``AdapterModel.state_dict()``
keys read ``base_model.model.<path>...`` exactly like a ``PeftModel``'s, which keeps full-model
checkpoints and adapter files in one naming scheme.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .combine import add_weighted_adapter
from .config import AdapterConfig, load_config
from .injection import (
    adapter_layers,
    cast_adapter,
    count_parameters,
    delete_adapter,
    inject_adapter,
    set_active_adapter,
    set_disabled,
    unload,
)
from .mixed_batch import routed
from .routing import BASE_ADAPTER
from .serialization import (
    LoadResult,
    get_adapter_state_dict,
    load_adapter_weights,
    save_adapter_weights,
    set_adapter_state_dict,
)
from .virtual_tokens import PromptLearningConfig, virtual_forward, virtual_generate


def _is_virtual(config: AdapterConfig) -> bool:
    return isinstance(config, PromptLearningConfig)


def _uses_activation_checkpointing(model: nn.Module) -> bool:
    """transformers >= 5 names it ``is_activation_checkpointing`` (the old name warns)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


class TunerModel(nn.Module):
    """Holds the adapted model as ``.model`` so parameter names match PEFT's ``LoraModel`` layout."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self._modules["model"], name)


class AdapterModel(nn.Module):
    """A model carrying one or more named adapters; one of them is active at a time.

    Weight-space adapters (LoRA) live inside the wrapped model; virtual-token adapters (prompt
    tuning, P-tuning, prefix tuning) keep their prompt encoder in ``prompt_encoder[<name>]``
    (PEFT's layout) and change what ``forward``/``generate`` feed the model.

    Attribute access that ``AdapterModel`` cannot answer falls through to the wrapped model
    (``config``, ``device``, ``generation_config``, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        config: AdapterConfig,
        adapter_name: str = "default",
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.base_model = TunerModel(model)
        self.prompt_encoder = nn.ModuleDict()
        self.peft_config: dict[str, AdapterConfig] = {}
        self._active_adapter: str | None = None
        self._adapters_disabled = False
        self.add_adapter(adapter_name, config, adapter_dtype=adapter_dtype)
        self.set_adapter(adapter_name)
        if _uses_activation_checkpointing(model):
            self.prepare_for_gradient_checkpointing()

    # ------------------------------------------------------------------ plumbing
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "prompt_encoder", "peft_config", "_active_adapter", "_adapters_disabled"):
                raise
            base = self._modules.get("base_model")
            if base is None:
                raise
            return getattr(base.model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with adapter layers inside)."""
        return self.base_model.model

    def _active_virtual(self) -> PromptLearningConfig | None:
        """The active adapter's config when it is a virtual-token one (and adapters are enabled)."""
        if self._adapters_disabled or self._active_adapter is None:
            return None
        config = self.peft_config[self._active_adapter]
        return config if isinstance(config, PromptLearningConfig) else None

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The model's forward with the active adapter, or -- given ``adapter_names``, one adapter
        name (or ``"__base__"``) per batch row -- each row with its own adapter (a mixed-adapter
        batch, see :mod:`adapters.mixed_batch`)."""
        if adapter_names is not None:
            kwargs.pop("task_ids", None)
            with self._mixed_batch(adapter_names, args, kwargs):
                return self.base_model.model(*args, **kwargs)
        config = self._active_virtual()
        if config is None:
            kwargs.pop("task_ids", None)  # only multitask prompt tuning reads them (as in PEFT)
            return self.base_model.model(*args, **kwargs)
        encoder = self.prompt_encoder[self.active_adapter]
        return virtual_forward(self.get_base_model(), config, encoder, *args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """``generate`` with the active adapter, or each row with its ``adapter_names`` entry."""
        if adapter_names is not None:
            kwargs.pop("task_ids", None)
            with self._mixed_batch(adapter_names, args, kwargs):
                return self.base_model.model.generate(*args, **kwargs)
        config = self._active_virtual()
        if config is None:
            kwargs.pop("task_ids", None)
            return self.base_model.model.generate(*args, **kwargs)
        encoder = self.prompt_encoder[self.active_adapter]
        return virtual_generate(self.get_base_model(), config, encoder, *args, **kwargs)

    def _mixed_batch(
        self, adapter_names: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> contextlib.AbstractContextManager[Any]:
        """Check a mixed-adapter call and return the context that routes rows to adapters."""
        if isinstance(adapter_names, str):
            raise TypeError(f"adapter_names must be a list with one adapter name per row, got {adapter_names!r}")
        names = list(adapter_names)
        unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise ValueError(
                f"adapter_names: unknown adapter(s) {unknown}; have {list(self.peft_config)} (or {BASE_ADAPTER!r})"
            )
        virtual = sorted({n for n in names if n != BASE_ADAPTER and _is_virtual(self.peft_config[n])})
        if virtual or self._active_virtual() is not None:
            which = virtual[0] if virtual else self.active_adapter
            raise ValueError(
                f"adapter_names: mixed-adapter batches route weight-space adapters; {which!r} is a virtual-token "
                "adapter (its tokens change the sequence, not a layer)"
            )
        root = self.get_base_model()
        if any(layer.merged for _, layer in adapter_layers(root)):
            raise ValueError("adapter_names: unmerge the merged adapters first (unmerge_adapter()); a merged adapter "
                             "would apply to every row")
        batch = _batch_rows(args, kwargs)
        if batch is not None and batch != len(names):
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {batch} rows")
        if torch.is_grad_enabled() and self.training and _uses_activation_checkpointing(root):
            raise ValueError(
                "adapter_names: mixed-adapter batches cannot train under gradient checkpointing (the recomputed "
                "forward would not see the routing); disable it or run without grad"
            )
        return routed(root, names)

    def prepare_for_gradient_checkpointing(self) -> None:
        """Make the embedding output require grad so reentrant checkpointing reaches the adapters."""
        model = self.get_base_model()
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()

    # ------------------------------------------------------------------ adapters
    @property
    def active_adapter(self) -> str:
        if self._active_adapter is None:
            raise ValueError("no adapter is active")
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return [] if self._active_adapter is None else [self._active_adapter]

    @property
    def active_peft_config(self) -> AdapterConfig:
        return self.peft_config[self.active_adapter]

    def _require(self, adapter_name: str) -> AdapterConfig:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; have {list(self.peft_config)}")
        return self.peft_config[adapter_name]

    def _refresh_trainable(self) -> None:
        if self._active_adapter is not None:
            set_active_adapter(self.get_base_model(), self._active_adapter, self.peft_config[self._active_adapter])
        self._refresh_prompt_encoders()

    def _refresh_prompt_encoders(self) -> None:
        """Only the active virtual-token adapter's encoder trains (and not in inference mode)."""
        for name, encoder in self.prompt_encoder.items():
            encoder.requires_grad_(name == self._active_adapter and not self.peft_config[name].inference_mode)

    def add_adapter(
        self, adapter_name: str, config: AdapterConfig, adapter_dtype: torch.dtype | None = None
    ) -> None:
        """Inject a new adapter (inactive and frozen until :meth:`set_adapter`, as in PEFT).

        The config is copied, so one config object can seed several adapters.
        """
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        config = config.copy()
        root = self.get_base_model()
        if _is_virtual(config):
            self._add_virtual_adapter(adapter_name, config, adapter_dtype)
            return
        self.peft_config[adapter_name] = config
        try:
            inject_adapter(root, config, adapter_name)
        except Exception:
            del self.peft_config[adapter_name]
            delete_adapter(root, adapter_name)
            raise
        if adapter_dtype is not None:
            cast_adapter(root, adapter_name, adapter_dtype)
        self._refresh_trainable()

    def _add_virtual_adapter(
        self, adapter_name: str, config: PromptLearningConfig, adapter_dtype: torch.dtype | None
    ) -> None:
        """Size ``config`` for the model and build its prompt encoder (fp32 unless ``adapter_dtype``, as PEFT)."""
        model = self.get_base_model()
        config.prepare_for_model(model)
        word_embeddings = model.get_input_embeddings()
        encoder = config.create_prompt_encoder(word_embeddings)
        encoder.to(device=word_embeddings.weight.device, dtype=adapter_dtype)
        encoder.requires_grad_(False)
        self.peft_config[adapter_name] = config
        self.prompt_encoder[adapter_name] = encoder
        self._refresh_trainable()

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` the one forward uses and the one that trains.

        A list must name exactly one adapter: several active adapters (in particular two
        virtual-token adapters, or a virtual-token adapter with a LoRA) raise ``ValueError``.
        """
        if not isinstance(adapter_name, str):
            names = list(adapter_name)
            virtual = [n for n in names if _is_virtual(self._require(n))]
            if len(virtual) > 1:
                raise ValueError(f"cannot activate virtual-token adapters {virtual} together; at most one can be active")
            if len(names) > 1 and virtual:
                others = [n for n in names if n not in virtual]
                raise ValueError(f"cannot activate virtual-token adapter {virtual[0]!r} together with {others}")
            if len(names) != 1:
                raise ValueError(f"AdapterModel activates one adapter at a time, got {names}")
            adapter_name = names[0]
        config = self._require(adapter_name)
        set_active_adapter(self.get_base_model(), adapter_name, config)
        self._active_adapter = adapter_name
        self._refresh_prompt_encoders()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter; if it was active, the first remaining adapter becomes active."""
        if _is_virtual(self._require(adapter_name)):
            del self.prompt_encoder[adapter_name]
        else:
            delete_adapter(self.get_base_model(), adapter_name)
        del self.peft_config[adapter_name]
        if self._active_adapter == adapter_name:
            self._active_adapter = None
            if self.peft_config:
                self.set_adapter(next(iter(self.peft_config)))

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
        svd_clamp: float | None = None,
    ) -> None:
        """Add LoRA adapter ``adapter_name`` combining ``adapters`` (PEFT's combination types:
        ``linear``, ``cat``, ``svd``, ``ties``, ``dare_linear``, ``dare_ties``, ...; see
        :mod:`adapters.combine`). It is added inactive, like any new adapter."""
        add_weighted_adapter(
            self, adapters, weights, adapter_name, combination_type=combination_type, svd_rank=svd_rank,
            density=density, majority_sign_method=majority_sign_method, svd_clamp=svd_clamp,
        )

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model alone inside the block (merged adapters are unmerged, then re-merged)."""
        root = self.get_base_model()
        merged = [(layer, list(layer.merged_adapters)) for _, layer in adapter_layers(root) if layer.merged]
        for layer, _ in merged:
            layer.unmerge()
        set_disabled(root, True)
        self._adapters_disabled = True
        try:
            yield
        finally:
            self._adapters_disabled = False
            set_disabled(root, False)
            for layer, names in merged:
                layer.merge(names)

    # ------------------------------------------------------------------ merging
    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        """Fold the active (or given) adapters into the base weights; forward gets cheaper."""
        self._refuse_merge(adapter_names)
        for _, layer in adapter_layers(self.get_base_model()):
            layer.merge(adapter_names)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter from the base weights again."""
        for _, layer in adapter_layers(self.get_base_model()):
            layer.unmerge()

    def _refuse_merge(self, adapter_names: list[str] | None) -> None:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        virtual = [n for n in names if n in self.peft_config and _is_virtual(self.peft_config[n])]
        if virtual:
            raise ValueError(f"virtual-token adapter {virtual[0]!r} has no weights to merge into the model")
        fixed = [n for n in names if n in self.peft_config and not getattr(self.peft_config[n], "MERGEABLE", True)]
        if fixed:
            kind = type(self.peft_config[fixed[0]]).__name__
            raise ValueError(f"{kind} adapter {fixed[0]!r} cannot be merged (its update is not a weight delta); use unload()")

    def _drop_prompt_encoders(self) -> None:
        for name in list(self.prompt_encoder):
            del self.prompt_encoder[name]

    def merge_and_unload(self, adapter_names: list[str] | None = None) -> nn.Module:
        """Return the plain model with the active adapter merged and every wrapper removed."""
        self._refuse_merge(adapter_names)
        self._drop_prompt_encoders()
        model = unload(self.get_base_model(), merge=True, adapter_names=adapter_names)
        self.peft_config.clear()
        self._active_adapter = None
        return model

    def unload(self) -> nn.Module:
        """Return the plain model with every wrapper removed and no adapter applied."""
        model = unload(self.get_base_model(), merge=False)
        self._drop_prompt_encoders()
        self.peft_config.clear()
        self._active_adapter = None
        return model

    # ------------------------------------------------------------------ parameters
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, counted the way PEFT counts them."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}"
        )

    # ------------------------------------------------------------------ state dicts
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Detached CPU copy of one adapter's weights with PEFT keys (default: the active one)."""
        name = adapter_name or self.active_adapter
        if _is_virtual(self._require(name)):
            return self.prompt_encoder[name].saved_state()
        return get_adapter_state_dict(self.get_base_model(), name, self._require(name))

    def load_adapter_state_dict(
        self, state_dict: dict[str, torch.Tensor], adapter_name: str | None = None
    ) -> LoadResult:
        """Copy PEFT-format weights into an existing adapter (default: the active one)."""
        name = adapter_name or self.active_adapter
        if _is_virtual(self._require(name)):
            return LoadResult([], self.prompt_encoder[name].load_saved(state_dict))
        return set_adapter_state_dict(self.get_base_model(), state_dict, name, self._require(name))

    # ------------------------------------------------------------------ files
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
    ) -> None:
        """Write each adapter as ``adapter_config.json`` + ``adapter_model.safetensors``.

        ``default`` goes to ``save_directory`` itself, any other adapter to
        ``save_directory/<name>/`` -- PEFT's layout, so ``PeftModel`` can load either.
        """
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._require(name)
        if not is_main_process:
            return
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file, expected a folder")
        base_name = getattr(self.get_base_model(), "name_or_path", None) or None
        for name in names:
            out_dir = save_directory if name == "default" else os.path.join(save_directory, name)
            save_adapter_weights(self.adapter_state_dict(name), out_dir)
            config = self.peft_config[name].copy(inference_mode=True)
            if config.base_model_name_or_path is None and isinstance(base_name, str):
                config.base_model_name_or_path = base_name
            config.save_pretrained(out_dir)

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        allow_pickle: bool = False,
        adapter_dtype: torch.dtype | None = None,
    ) -> LoadResult:
        """Add adapter ``adapter_name`` from a folder (PEFT- or raypeft-written); not activated."""
        config = load_config(model_id)
        config.inference_mode = _inference_mode_for_build(config, is_trainable)
        weights = load_adapter_weights(model_id, allow_pickle=allow_pickle)
        self.add_adapter(adapter_name, config, adapter_dtype=adapter_dtype)
        try:
            result = self.load_adapter_state_dict(weights, adapter_name)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self.peft_config[adapter_name].inference_mode = not is_trainable
        self._refresh_trainable()
        return result

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        allow_pickle: bool = False,
        adapter_dtype: torch.dtype | None = None,
    ) -> AdapterModel:
        """Wrap ``model`` with the adapter saved in ``model_id`` and make it active."""
        config = load_config(model_id)
        config.inference_mode = _inference_mode_for_build(config, is_trainable)
        weights = load_adapter_weights(model_id, allow_pickle=allow_pickle)
        wrapped = cls(model, config, adapter_name=adapter_name, adapter_dtype=adapter_dtype)
        wrapped.load_adapter_state_dict(weights, adapter_name)
        if wrapped.peft_config[adapter_name].inference_mode != (not is_trainable):
            wrapped.peft_config[adapter_name].inference_mode = not is_trainable
            wrapped._refresh_trainable()
        return wrapped


def _batch_rows(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """Rows of the batch a forward/generate call was given (``None`` when it cannot tell)."""
    for value in (*args[:1], kwargs.get("input_ids"), kwargs.get("inputs"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return int(value.shape[0])
    return None


def _inference_mode_for_build(config: AdapterConfig, is_trainable: bool) -> bool:
    """Virtual-token adapters from a file are built in PEFT's inference layout (the file holds the
    encoder's output, not its MLP/LSTM/projection head) and only then made trainable if asked."""
    return True if _is_virtual(config) else not is_trainable


def get_adapter_model(
    model: nn.Module,
    config: AdapterConfig,
    adapter_name: str = "default",
    adapter_dtype: torch.dtype | None = None,
) -> AdapterModel:
    """Wrap ``model`` with a fresh adapter described by ``config`` (PEFT's ``get_peft_model``).

    Adapter tensors are created in the base weights' dtype unless ``adapter_dtype`` is given
    (e.g. ``torch.float32`` master weights on a bf16 base).
    """
    return AdapterModel(model, config, adapter_name=adapter_name, adapter_dtype=adapter_dtype)
