"""The adapter-method registry: one line per method, from which every list of methods is derived.

A line ties the name a user writes (``adapter.method`` in a run config, plus aliases) to the config
class (and through it to PEFT's ``peft_type``), and says which of the config's fields a user sets
and which identify a trained adapter (its registry tags). Field types, defaults and constraints
are not repeated here: they are the config class's own (:mod:`adapters.constraints`).

Adding a method: its module (config class + layer), one line in :data:`METHODS`, tests and the
README table. The YAML schema, the sweep's per-method fields, the tags of a published adapter and
the method of a saved ``adapter_config.json`` all follow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .adalora import AdaLoraConfig
from .bottleneck import BottleneckConfig, bottleneck_tags
from .config import AdapterConfig
from .ia3 import IA3Config
from .llama_adapter import AdaptionPromptConfig
from .loha import LoHaConfig
from .lokr import LoKrConfig
from .lora import LoraConfig
from .multitask_prompt_tuning import MultitaskPromptTuningConfig
from .p_tuning import PromptEncoderConfig
from .prefix_tuning import PrefixTuningConfig
from .prompt_tuning import PromptTuningConfig

Tags = tuple[str, ...] | Callable[[Mapping[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class AdapterMethod:
    """One adapter method as users name it.

    ``user_fields``: the config fields a run config may set (the rest are filled from the model or
    are file bookkeeping). ``user_defaults``: where a run config defaults differently from the
    library (which keeps PEFT's defaults), e.g. ``target_modules: all-linear`` instead of PEFT's
    per-architecture choice. ``tags``: the fields that identify a trained adapter (unset and false
    values are left out), or a function of the config values for methods whose tags depend on
    each other.
    """

    name: str
    config_class: type[AdapterConfig]
    user_fields: tuple[str, ...]
    tags: Tags = ()
    aliases: tuple[str, ...] = ()
    user_defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = {f.name for f in dataclasses.fields(self.config_class)}
        unknown = [n for n in (*self.user_fields, *self.user_defaults) if n not in known]
        if not callable(self.tags):
            unknown += [n for n in self.tags if n not in known]
        if unknown:
            raise TypeError(f"adapter method {self.name!r}: {unknown} are not fields of {self.config_class.__name__}")

    @property
    def peft_type(self) -> str:
        return self.config_class.PEFT_TYPE

    @property
    def names(self) -> tuple[str, ...]:
        """The canonical name and its aliases."""
        return (self.name, *self.aliases)

    def registry_tags(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """``{"method": name, <tag field>: value, ...}`` from config values (a YAML block's, or a
        saved ``adapter_config.json``)."""
        if callable(self.tags):
            return {"method": self.name, **self.tags(values)}
        tags: dict[str, Any] = {"method": self.name}
        for key in self.tags:
            value = values.get(key)
            if value is not None and value is not False:
                tags[key] = value
        return tags


_ALL_LINEAR = {"target_modules": "all-linear"}
_TOKENS = {"num_virtual_tokens": 20}  # PEFT has no default (the library requires it); a run config has
_LYCORIS = ("r", "alpha", "rank_dropout", "module_dropout", "target_modules", "modules_to_save", "init_weights")

METHODS: tuple[AdapterMethod, ...] = (
    AdapterMethod("lora", LoraConfig, ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora",
                                       "modules_to_save", "init_lora_weights", "use_dora"),
                  tags=("r", "lora_alpha", "use_dora"), user_defaults=_ALL_LINEAR),
    AdapterMethod("prompt", PromptTuningConfig, ("num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text"),
                  tags=("num_virtual_tokens",), user_defaults=_TOKENS),
    AdapterMethod("prefix", PrefixTuningConfig, ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size"),
                  tags=("num_virtual_tokens",), user_defaults=_TOKENS),
    AdapterMethod("ptuning", PromptEncoderConfig, ("num_virtual_tokens", "encoder_reparameterization_type",
                                                   "encoder_hidden_size", "encoder_num_layers", "encoder_dropout"),
                  tags=("num_virtual_tokens",), user_defaults=_TOKENS),
    AdapterMethod("ia3", IA3Config, ("target_modules", "feedforward_modules", "modules_to_save", "init_ia3_weights")),
    AdapterMethod("loha", LoHaConfig, _LYCORIS, tags=("r", "alpha"), user_defaults=_ALL_LINEAR),
    AdapterMethod("lokr", LoKrConfig, (*_LYCORIS, "decompose_both", "decompose_factor", "rank_dropout_scale"),
                  tags=("r", "alpha"), user_defaults=_ALL_LINEAR),
    AdapterMethod("adalora", AdaLoraConfig, ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                                             "orth_reg_weight", "total_step", "lora_alpha", "lora_dropout",
                                             "target_modules", "modules_to_save"),
                  tags=("init_r", "target_r"), user_defaults=_ALL_LINEAR),
    AdapterMethod("bottleneck", BottleneckConfig, ("bottleneck_size", "reduction_factor", "placement", "non_linearity",
                                                   "adapter_dropout", "target_modules", "modules_to_save"),
                  tags=bottleneck_tags),
    AdapterMethod("adaption_prompt", AdaptionPromptConfig, ("adapter_len", "adapter_layers", "target_modules"),
                  tags=("adapter_len", "adapter_layers"), aliases=("llama_adapter",)),
    AdapterMethod("multitask_prompt", MultitaskPromptTuningConfig,
                  ("num_virtual_tokens", "num_tasks", "num_ranks", "prompt_tuning_init", "prompt_tuning_init_text",
                   "prompt_tuning_init_state_dict_path", "prompt_tuning_init_task"),
                  tags=("num_virtual_tokens", "num_tasks"), user_defaults=_TOKENS),
)


def _index() -> tuple[dict[str, AdapterMethod], dict[str, AdapterMethod]]:
    by_name: dict[str, AdapterMethod] = {}
    by_peft_type: dict[str, AdapterMethod] = {}
    for method in METHODS:
        for name in method.names:
            if name in by_name:
                raise TypeError(f"adapter method name {name!r} is registered twice")
            by_name[name] = method
        if method.peft_type in by_peft_type:
            raise TypeError(f"peft_type {method.peft_type!r} has two adapter methods")
        by_peft_type[method.peft_type] = method
    return by_name, by_peft_type


_BY_NAME, _BY_PEFT_TYPE = _index()


def method_names(aliases: bool = True) -> list[str]:
    """Every name ``adapter.method`` accepts, in registry order (aliases after their method)."""
    return [name for m in METHODS for name in (m.names if aliases else (m.name,))]


def method_named(name: str) -> AdapterMethod:
    """The method called ``name`` (an alias gives its canonical method)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown adapter method {name!r}; expected one of {', '.join(_BY_NAME)}") from None


def method_for_peft_type(peft_type: str) -> AdapterMethod | None:
    """The method whose config writes ``peft_type`` (``None`` for a type no method has)."""
    return _BY_PEFT_TYPE.get(str(peft_type).upper())
