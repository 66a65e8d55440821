"""The ``adapter`` section: one spec per adapter method, discriminated by ``method``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from raypeft.pipeline.config.base import StrictModel

class _AdapterSpecBase(StrictModel):
    """Fields every adapter method shares; the rest of a spec maps one-to-one to its config class."""

    init_from: str | None = None

    def adapter_kwargs(self) -> dict[str, Any]:
        """Fields that belong to the adapter config (everything but pipeline-only keys)."""
        return self.model_dump(exclude={"method", "init_from"})

    def registry_tags(self) -> dict[str, Any]:
        """The hyperparameters that identify this adapter in the registry and in sweeps."""
        return {"method": self.method}


class LoraSpec(_AdapterSpecBase):
    """LoRA with PEFT's field names, so a YAML block reads like a ``LoraConfig``."""

    method: Literal["lora"] = "lora"
    r: int = Field(default=8, gt=0)
    lora_alpha: float = Field(default=16, gt=0)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | Literal["gaussian"] = True
    use_dora: bool = False  # DoRA: a trained per-output magnitude on top of the low-rank direction

    def registry_tags(self) -> dict[str, Any]:
        tags: dict[str, Any] = {"method": self.method, "r": self.r, "lora_alpha": self.lora_alpha}
        if self.use_dora:
            tags["use_dora"] = True
        return tags


class _VirtualTokenSpec(_AdapterSpecBase):
    """Methods that learn virtual tokens; PEFT fills token_dim, num_layers, ... from the model."""

    num_virtual_tokens: int = Field(default=20, gt=0)

    def registry_tags(self) -> dict[str, Any]:
        return {"method": self.method, "num_virtual_tokens": self.num_virtual_tokens}


class PromptSpec(_VirtualTokenSpec):
    """Prompt tuning (``PromptTuningConfig``): learned input embeddings prepended to every row."""

    method: Literal["prompt"] = "prompt"
    prompt_tuning_init: Literal["RANDOM", "TEXT", "SAMPLE_VOCAB"] = "RANDOM"
    prompt_tuning_init_text: str | None = None

    @field_validator("prompt_tuning_init_text")
    @classmethod
    def _text_not_blank(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("must not be blank")
        return v


class PrefixSpec(_VirtualTokenSpec):
    """Prefix tuning (``PrefixTuningConfig``): learned key/value prefixes in every layer."""

    method: Literal["prefix"] = "prefix"
    prefix_projection: bool = False
    encoder_hidden_size: int | None = Field(default=None, gt=0)


class PTuningSpec(_VirtualTokenSpec):
    """P-tuning (``PromptEncoderConfig``): virtual tokens produced by a small MLP or LSTM."""

    method: Literal["ptuning"] = "ptuning"
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"
    encoder_hidden_size: int | None = Field(default=None, gt=0)
    encoder_num_layers: int = Field(default=2, gt=0)
    encoder_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class IA3Spec(_AdapterSpecBase):
    """(IA)^3 (``IA3Config``): learned vectors scaling keys, values and the feed-forward input.

    ``target_modules`` / ``feedforward_modules`` unset: PEFT's per-architecture defaults (Llama:
    ``k_proj``, ``v_proj``, ``down_proj``, the last one scaled on its input).
    """

    method: Literal["ia3"] = "ia3"
    target_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True


class _LycorisSpec(_AdapterSpecBase):
    """LoHa and LoKr share LyCORIS's fields (``scaling = alpha / r``); all linear layers by default, as LoRA."""

    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=8, gt=0)
    rank_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    module_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None

    def registry_tags(self) -> dict[str, Any]:
        return {"method": self.method, "r": self.r, "alpha": self.alpha}


class LoHaSpec(_LycorisSpec):
    """LoHa (``LoHaConfig``): the update is the Hadamard product of two rank-``r`` products."""

    method: Literal["loha"] = "loha"
    init_weights: bool = True


class LoKrSpec(_LycorisSpec):
    """LoKr (``LoKrConfig``): the update is a Kronecker product, its second factor rank-``r``."""

    method: Literal["lokr"] = "lokr"
    init_weights: Literal[True, False, "lycoris"] = True
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    @field_validator("decompose_factor")
    @classmethod
    def _factor(cls, v: int) -> int:
        if v != -1 and v <= 0:
            raise ValueError("must be -1 (balanced) or a positive integer")
        return v


class AdaLoraSpec(_AdapterSpecBase):
    """AdaLoRA (``AdaLoraConfig``): SVD-shaped updates whose rank budget shrinks from ``init_r`` to
    ``target_r`` per module on average. The SFT loop adds the orthogonality penalty to the loss and
    runs the rank allocator every step; ``total_step`` unset = the stage's own step count.
    """

    method: Literal["adalora"] = "adalora"
    init_r: int = Field(default=12, gt=0)
    target_r: int = Field(default=8, gt=0)
    tinit: int = Field(default=0, ge=0)
    tfinal: int = Field(default=0, ge=0)
    deltaT: int = Field(default=1, gt=0)  # noqa: N815 - PEFT's field name
    beta1: float = Field(default=0.85, gt=0.0, lt=1.0)
    beta2: float = Field(default=0.85, gt=0.0, lt=1.0)
    orth_reg_weight: float = Field(default=0.5, ge=0.0)
    total_step: int | None = Field(default=None, gt=0)
    lora_alpha: float = Field(default=8, gt=0)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None

    @field_validator("target_r")
    @classmethod
    def _target_below_init(cls, v: int, info) -> int:
        init_r = info.data.get("init_r")
        if init_r is not None and v > init_r:
            raise ValueError(f"must not exceed adapter.init_r ({init_r}): the rank budget only shrinks")
        return v

    @field_validator("total_step")
    @classmethod
    def _room_to_budget(cls, v: int | None, info) -> int | None:
        tinit, tfinal = info.data.get("tinit", 0), info.data.get("tfinal", 0)
        if v is not None and tinit is not None and tfinal is not None and tinit >= v - tfinal:
            raise ValueError(f"must exceed adapter.tinit + adapter.tfinal ({tinit} + {tfinal}) to leave a budgeting phase")
        return v

    def registry_tags(self) -> dict[str, Any]:
        return {"method": self.method, "init_r": self.init_r, "target_r": self.target_r}


class BottleneckSpec(_AdapterSpecBase):
    """Bottleneck adapters (``BottleneckConfig``): a residual down-act-up MLP after attention and the
    feed-forward network (``houlsby``) or after the feed-forward network only (``pfeiffer``).
    Inner width: ``bottleneck_size``, or output width // ``reduction_factor`` (16 when neither)."""

    method: Literal["bottleneck"] = "bottleneck"
    bottleneck_size: int | None = Field(default=None, gt=0)
    reduction_factor: float | None = Field(default=None, gt=0)
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    non_linearity: Literal["relu", "gelu", "silu"] = "relu"
    adapter_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    @field_validator("reduction_factor")
    @classmethod
    def _one_width(cls, v: float | None, info) -> float | None:
        if v is not None and info.data.get("bottleneck_size") is not None:
            raise ValueError("set adapter.bottleneck_size or adapter.reduction_factor, not both")
        return v

    def registry_tags(self) -> dict[str, Any]:
        tags: dict[str, Any] = {"method": self.method, "placement": self.placement}
        if self.bottleneck_size is not None:
            tags["bottleneck_size"] = self.bottleneck_size
        else:
            tags["reduction_factor"] = self.reduction_factor or 16
        return tags


class AdaptionPromptSpec(_AdapterSpecBase):
    """LLaMA-Adapter (PEFT's ``AdaptionPromptConfig``; ``method: llama_adapter`` is accepted too):
    ``adapter_len`` learned prompt vectors in each of the top ``adapter_layers`` attention modules,
    behind a zero-initialised gate. Llama-architecture models (Llama, Mistral, Qwen2)."""

    method: Literal["adaption_prompt", "llama_adapter"] = "adaption_prompt"
    adapter_len: int = Field(default=10, gt=0)
    adapter_layers: int = Field(gt=0)
    target_modules: str | None = None

    @field_validator("method")
    @classmethod
    def _canonical(cls, v: str) -> str:
        return "adaption_prompt"

    def registry_tags(self) -> dict[str, Any]:
        return {"method": self.method, "adapter_len": self.adapter_len, "adapter_layers": self.adapter_layers}


class MultitaskPromptSpec(_VirtualTokenSpec):
    """Multitask prompt tuning (``MultitaskPromptTuningConfig``): a shared prompt modulated per task
    by a rank-``num_ranks`` factor. Each row's task comes from ``data.columns.task_id`` or, when that
    is unset, is the fixed ``task_id`` (default 0). Source inits read a safetensors checkpoint."""

    method: Literal["multitask_prompt"] = "multitask_prompt"
    num_tasks: int = Field(default=1, gt=0)
    num_ranks: int = Field(default=1, gt=0)
    prompt_tuning_init: Literal["RANDOM", "TEXT", "SAMPLE_VOCAB", "AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK",
                                "ONLY_SOURCE_SHARED"] = "RANDOM"
    prompt_tuning_init_text: str | None = None
    prompt_tuning_init_state_dict_path: str | None = None
    prompt_tuning_init_task: int = Field(default=0, ge=0)
    task_id: int | None = Field(default=None, ge=0)

    @field_validator("prompt_tuning_init_state_dict_path")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        """Made absolute on the driver: Ray workers run in other folders."""
        return None if v is None else str(Path(v).expanduser().resolve())

    def adapter_kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude={"method", "init_from", "task_id"})

    def registry_tags(self) -> dict[str, Any]:
        return {"method": self.method, "num_virtual_tokens": self.num_virtual_tokens, "num_tasks": self.num_tasks}


AdapterSpec = Annotated[
    Union[LoraSpec, PromptSpec, PrefixSpec, PTuningSpec, IA3Spec, LoHaSpec, LoKrSpec, AdaLoraSpec, BottleneckSpec,
          AdaptionPromptSpec, MultitaskPromptSpec],
    Field(discriminator="method"),
]
ADAPTER_SPECS: dict[str, type[_AdapterSpecBase]] = {
    "lora": LoraSpec, "prompt": PromptSpec, "prefix": PrefixSpec, "ptuning": PTuningSpec, "ia3": IA3Spec,
    "loha": LoHaSpec, "lokr": LoKrSpec, "adalora": AdaLoraSpec, "bottleneck": BottleneckSpec,
    "adaption_prompt": AdaptionPromptSpec, "llama_adapter": AdaptionPromptSpec, "multitask_prompt": MultitaskPromptSpec,
}
# Stages that feed multitask prompt tuning its task ids (the others build batches without them).
TASK_ID_STAGES = ("sft",)
