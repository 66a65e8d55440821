"""The YAML schema of a raypeft run, validated at the boundary.

Every field a user can write lives here, typed, so that a bad file fails on the driver before
Ray starts, with one line naming the field path, what was expected and what was found
(``ConfigError``). Stage code receives the validated model and never re-checks types.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

# Also the values an adapter-input field (``reward.init_from``, ``ppo.policy_init``, ...) may take
# besides a folder or a ``models:/`` / ``runs:/`` URI: a stage name means that stage's published
# adapter in this workflow (``<output_dir>/<name>/<stage>/adapter``).
STAGES = ("sft", "reward", "dpo", "ppo")


class ConfigError(ValueError):
    """A config problem, phrased as one line: ``<field path>: <problem>``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class QuantizationSpec(_Strict):
    """The shared base in bitsandbytes 4-bit (QLoRA) or 8-bit; names as in ``BitsAndBytesConfig``.

    ``bnb_4bit_quant_storage`` matters under ZeRO-3: DeepSpeed partitions parameters of one
    dtype, so storing the packed 4-bit weights as the compute dtype lets it shard them.
    """

    bits: Literal[4, 8] = 4
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    bnb_4bit_quant_storage: Literal["uint8", "float32", "bfloat16", "float16"] = "uint8"
    llm_int8_skip_modules: list[str] | None = None


class ModelSpec(_Strict):
    """The base model every role shares: ``demo``, a hub id, or a local folder."""

    name_or_path: str = "demo"
    task_type: Literal["CAUSAL_LM", "SEQ_2_SEQ_LM"] = "CAUSAL_LM"
    revision: str | None = None
    tokenizer: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    # Input adapters saved as a pickle (adapter_model.bin) are refused unless this is on; they
    # are then read with torch.load(weights_only=True) and converted to safetensors on the driver.
    allow_pickle_adapters: bool = False
    quantization: QuantizationSpec | None = None
    # Recompute activations in backward (non-reentrant): less memory for more compute.
    gradient_checkpointing: bool = False


class Columns(_Strict):
    prompt: str = "prompt"
    response: str = "response"
    # Multitask prompt tuning only: the integer column holding each row's task id.
    task_id: str | None = None


class DataSpec(_Strict):
    """Where the examples come from and how a prompt is formatted.

    ``source: demo`` is the embedded corpus; anything else is a local file, folder or glob
    (json/jsonl/parquet/csv) or a hub dataset id. ``eval_source`` (or ``eval_split`` of a hub
    dataset, or ``eval_fraction`` of the train rows) gives the held-out split for ROUGE.
    """

    source: str = "demo"
    train_split: str = "train"
    subset: str | None = None
    file_format: Literal["json", "jsonl", "parquet", "csv"] | None = None
    eval_source: str | None = None
    eval_split: str | None = None
    eval_fraction: float | None = Field(default=None, gt=0.0, lt=1.0)
    columns: Columns = Columns()
    prompt_template: str = "{prompt}"
    max_length: int = Field(default=256, gt=8)
    truncation: Literal["left-prompt", "error"] = "left-prompt"
    max_train_rows: int | None = Field(default=None, gt=0)

    @field_validator("prompt_template")
    @classmethod
    def _template_has_prompt(cls, v: str) -> str:
        if "{prompt}" not in v:
            raise ValueError("must contain '{prompt}'")
        return v


class _AdapterSpecBase(_Strict):
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


def check_adapter_setup(cfg: "RunConfig") -> str | None:
    """Rules that tie the adapter block to the rest of the file; the first broken one as
    ``"<field path>: <problem>"`` (``None`` when all hold)."""
    adapter = cfg.adapter
    column = cfg.data.columns.task_id
    if column is not None and not isinstance(adapter, MultitaskPromptSpec):
        return f"data.columns.task_id: only adapter.method multitask_prompt reads task ids (method is '{adapter.method}')"
    if isinstance(adapter, MultitaskPromptSpec):
        if column is not None and adapter.task_id is not None:
            return "adapter.task_id: set a fixed task id or data.columns.task_id, not both"
        if (adapter.task_id or 0) >= adapter.num_tasks:
            return f"adapter.task_id: must be below adapter.num_tasks ({adapter.num_tasks}), got {adapter.task_id}"
        others = [s for s in cfg.stages if s not in TASK_ID_STAGES]
        if others:
            return (f"adapter.method: multitask_prompt needs task ids in every batch, which only the "
                    f"{'/'.join(TASK_ID_STAGES)} stage feeds; stages {others} cannot use it")
    if isinstance(adapter, AdaLoraSpec) and getattr(cfg, "deepspeed", None) is not None:
        return ("deepspeed: adapter.method adalora allocates ranks from the gradients between backward and the "
                "optimiser step, which the DeepSpeed engine does not expose; use deepspeed: null")
    return None


class SFTSpec(_Strict):
    """Optimisation settings of the SFT stage (per worker batch size)."""

    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=16, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    learning_rate: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    log_every: int = Field(default=10, gt=0)
    checkpoint_every: int = Field(default=100, gt=0)


FileFormat = Literal["json", "jsonl", "parquet", "csv"]


def _adapter_ref(value: str | None) -> str | None:
    """An adapter input: a stage name, a folder, or ``models:/...`` / ``runs:/...`` (checked in preflight)."""
    if value is not None and not value.strip():
        raise ValueError("must not be blank (a stage name, a folder, or a models:/ URI; null for none)")
    return value


class PairColumns(_Strict):
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


class PairDataSpec(_Strict):
    """Preference pairs for the reward and DPO stages: ``demo`` or a file, folder, glob or hub id.

    Held-out pairs come from ``eval_source``, ``eval_split``, or ``eval_fraction`` of the train
    rows (5% when none is given). The prompt template, ``max_length`` and ``truncation`` are the
    ``data`` block's, so the pairs are formatted exactly like the SFT rows.
    """

    source: str = "demo"
    train_split: str = "train"
    subset: str | None = None
    file_format: FileFormat | None = None
    eval_source: str | None = None
    eval_split: str | None = None
    eval_fraction: float | None = Field(default=None, gt=0.0, lt=1.0)
    columns: PairColumns = PairColumns()
    max_train_rows: int | None = Field(default=None, gt=0)
    max_eval_rows: int | None = Field(default=200, gt=0)


class PromptDataSpec(_Strict):
    """Prompts for PPO rollouts (one column), formatted with ``data.prompt_template``."""

    source: str = "demo"
    split: str = "train"
    subset: str | None = None
    file_format: FileFormat | None = None
    column: str = "prompt"
    max_rows: int | None = Field(default=None, gt=0)


class _PairStageSpec(_Strict):
    """Optimisation settings shared by the reward and DPO stages (``batch_size``: pairs per worker)."""

    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=8, gt=0)
    learning_rate: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    log_every: int = Field(default=10, gt=0)
    checkpoint_every: int = Field(default=100, gt=0)
    eval_every: int | None = Field(default=None, gt=0)
    data: PairDataSpec = PairDataSpec()


class RewardSpec(_PairStageSpec):
    """Reward model: an adapter plus a scalar value head, Bradley-Terry loss on chosen/rejected.

    ``init_from`` is the adapter it starts from (default: the SFT stage's output); null starts a
    fresh adapter from the ``adapter`` block on the bare base. The value head always starts at zero.
    """

    init_from: str | None = "sft"

    @field_validator("init_from")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        return _adapter_ref(v)


class DPOSpec(_PairStageSpec):
    """Direct preference optimisation of the policy adapter against a frozen reference.

    ``policy_init``: the adapter the policy starts from (default: the SFT output; null: a fresh
    adapter). ``reference``: ``policy_init`` (a frozen copy of that adapter, or the bare base when
    the policy starts fresh), ``base`` (all adapters disabled), or any adapter input.
    """

    policy_init: str | None = "sft"
    reference: str = "policy_init"
    beta: float = Field(default=0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    learning_rate: float = Field(default=5e-4, gt=0)

    @field_validator("policy_init", "reference")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        return _adapter_ref(v)


class GenerationSpec(_Strict):
    """How PPO samples responses (``generate`` settings); log-probs use the same temperature."""

    max_new_tokens: int = Field(default=48, gt=0)
    temperature: float = Field(default=1.0, gt=0)
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)


class KLSpec(_Strict):
    """The per-token KL penalty to the reference: a fixed coefficient or an adaptive one.

    Adaptive (Ziegler et al. 2019) moves ``coef`` so the sequence KL tracks ``target`` (nats),
    at a speed set by ``horizon`` (in sampled sequences).
    """

    controller: Literal["fixed", "adaptive"] = "adaptive"
    coef: float = Field(default=0.05, ge=0)
    target: float = Field(default=6.0, gt=0)
    horizon: int = Field(default=10000, gt=0)


class PPOSpec(_Strict):
    """PPO of the policy adapter against the reward role, with a critic role for the values.

    Each of ``max_steps`` steps samples ``rollout_batch_size`` prompts per worker, scores the
    responses, then runs ``ppo_epochs`` passes over them in ``minibatches`` minibatches.
    ``critic_init``: the adapter and value head the critic starts from (default: the reward
    model's); null: a fresh adapter from the ``adapter`` block and a zero value head. The last
    ``eval_prompts`` prompts are held out: the policy's mean reward and KL on them are measured
    before training, every ``eval_every`` steps and after.
    """

    policy_init: str | None = "sft"
    reference: str = "policy_init"
    reward_adapter: str = "reward"
    critic_init: str | None = "reward"
    data: PromptDataSpec = PromptDataSpec()
    max_steps: int = Field(default=20, gt=0)
    rollout_batch_size: int = Field(default=16, gt=0)
    minibatches: int = Field(default=2, gt=0)
    ppo_epochs: int = Field(default=4, gt=0)
    learning_rate: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    generation: GenerationSpec = GenerationSpec()
    kl: KLSpec = KLSpec()
    gamma: float = Field(default=1.0, ge=0, le=1)
    lam: float = Field(default=0.95, ge=0, le=1)
    cliprange: float = Field(default=0.2, gt=0)
    cliprange_value: float = Field(default=0.2, gt=0)
    vf_coef: float = Field(default=0.1, ge=0)
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = Field(default=None, ge=0)
    eval_prompts: int = Field(default=64, ge=0)
    eval_every: int | None = Field(default=None, gt=0)
    log_every: int = Field(default=1, gt=0)
    checkpoint_every: int = Field(default=10, gt=0)

    @field_validator("policy_init", "reference", "reward_adapter", "critic_init")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        return _adapter_ref(v)

    @field_validator("minibatches")
    @classmethod
    def _minibatches_divide(cls, v: int, info) -> int:
        batch = info.data.get("rollout_batch_size")
        if batch is not None and batch % v:
            raise ValueError(f"must divide ppo.rollout_batch_size ({batch})")
        return v


class EvalSpec(_Strict):
    """Held-out ROUGE of generated responses, before and after a stage."""

    rouge: bool = True
    max_rows: int | None = Field(default=100, gt=0)
    max_new_tokens: int = Field(default=48, gt=0)
    batch_size: int = Field(default=32, gt=0)


class ScalingSpec(_Strict):
    """Maps to Ray Train's ``ScalingConfig``: one worker per GPU or per CPU slot."""

    num_workers: int = Field(default=1, gt=0)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None


class FailureSpec(_Strict):
    max_failures: int = Field(default=0, ge=-1)


class TrackingSpec(_Strict):
    """MLflow: a local SQLite store by default; a URI here or MLFLOW_TRACKING_URI overrides."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    uri: str | None = None
    experiment: str = "raypeft"
    artifact_location: str | None = None
    register_adapter: bool = Field(default=True, alias="register")
    registered_model_name: str | None = None


class RunConfig(_Strict):
    name: str = "raypeft"
    seed: int = 0
    output_dir: str = "outputs"
    stages: list[Literal["sft", "reward", "dpo", "ppo"]] = Field(default=["sft"], min_length=1)
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    adapter: AdapterSpec = LoraSpec()
    sft: SFTSpec = SFTSpec()
    reward: RewardSpec = RewardSpec()
    dpo: DPOSpec = DPOSpec()
    ppo: PPOSpec = PPOSpec()
    eval: EvalSpec = EvalSpec()
    scaling: ScalingSpec = ScalingSpec()
    failure: FailureSpec = FailureSpec()
    tracking: TrackingSpec = TrackingSpec()
    # The training engine of every stage: null = plain PyTorch (gradients all-reduced over the
    # workers); a shipped name (zero2, zero3, zero3_offload), a DeepSpeed JSON path or an inline
    # mapping = DeepSpeed with that config (``pipeline.deepspeed_configs``).
    deepspeed: Any = None

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_resolves(cls, v: Any) -> Any:
        from pipeline.deepspeed_configs import resolve

        if v is not None and not isinstance(v, (str, dict)):
            raise ValueError("expected a shipped config name, a DeepSpeed JSON path, a mapping or null")
        resolve(v)  # a bad name, a missing file or bad JSON fails here, on the driver
        return v

    def deepspeed_config(self) -> dict[str, Any] | None:
        """The resolved DeepSpeed config (a fresh dict), or None for plain PyTorch."""
        from pipeline.deepspeed_configs import resolve

        return resolve(self.deepspeed)

    @model_validator(mode="after")
    def _adapter_fits_the_run(self) -> "RunConfig":
        problem = check_adapter_setup(self)
        if problem:
            raise PydanticCustomError("cross_field", "{problem}", {"problem": problem})
        return self

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", v):
            raise ValueError("must be letters, digits, '_', '.', '-' (it names runs and folders)")
        return v

    @field_validator("stages")
    @classmethod
    def _stages_once(cls, v: list[str]) -> list[str]:
        repeated = sorted({s for s in v if v.count(s) > 1})
        if repeated:
            raise ValueError(f"each stage may appear once, '{repeated[0]}' appears {v.count(repeated[0])} times")
        return v

    # Resolved locations, made absolute on the driver so every worker agrees on them.
    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser().resolve() / self.name

    def tracking_uri(self) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return "sqlite:///" + str(Path("mlflow.db").resolve())

    def artifact_location(self) -> str | None:
        """Where a new experiment keeps artifacts: the YAML's choice; else, for a tracking server
        (http/https), None so the server's own artifact root / proxy applies (a local folder would
        be the job's temporary working dir under ``ray job submit``); else ./mlartifacts."""
        if self.tracking.artifact_location:
            return self.tracking.artifact_location
        if self.tracking_uri().startswith(("http://", "https://")):
            return None
        return Path("mlartifacts").resolve().as_uri()

    def registered_name(self, stage: str) -> str:
        return self.tracking.registered_model_name or f"{self.name}-{stage}"

    def stage_adapter_dir(self, stage: str) -> Path:
        """Where ``stage`` publishes its adapter; a stage-name adapter input resolves here."""
        return self.output_path() / stage / "adapter"


# ----------------------------------------------------------------------------- loading

def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _model_fields_at(model: type[BaseModel], data: Any, path: tuple) -> tuple[type[BaseModel] | None, Any]:
    """Walk the schema along ``path`` so unknown keys can be answered with a did-you-mean."""
    current: Any = model
    node = data
    for key in path:
        if current is None or not isinstance(node, dict):
            return None, None
        if current is RunConfig and key == "adapter":
            method = node.get("adapter", {}).get("method", "lora") if isinstance(node.get("adapter"), dict) else "lora"
            current = ADAPTER_SPECS.get(method)
            node = node.get(key)
            continue
        field = current.model_fields.get(key) if isinstance(current, type) and issubclass(current, BaseModel) else None
        if field is None:
            return None, None
        ann = field.annotation
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        node = node.get(key)
    return current, node


def _format_error(err: dict, data: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in ADAPTER_SPECS and err["loc"][0] == "adapter"))
    path = ".".join(str(p) for p in loc) or "<root>"
    kind = err["type"]
    if kind == "cross_field":  # already "<field path>: <problem>" (RunConfig._adapter_fits_the_run)
        return err["msg"]
    if kind == "extra_forbidden":
        parent, _ = _model_fields_at(RunConfig, data, loc[:-1])
        known = sorted(parent.model_fields) if parent else []
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        tail = f"; did you mean '{hint[0]}'?" if hint else (f"; known keys: {', '.join(known)}" if known else "")
        if loc[0] == "adapter" and parent is not None and not hint:
            method = data.get("adapter", {}).get("method", "lora")
            tail = f"; it is not a field of method '{method}' (fields: {', '.join(known)})"
        return f"{path}: unknown key{tail}"
    if kind == "union_tag_invalid":
        method = (err.get("input") or {}).get("method")
        return f"{path}.method: unknown method {_describe(method)}; expected one of {', '.join(ADAPTER_SPECS)}"
    got = _describe(err.get("input"))
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{path}: {msg[0].lower() + msg[1:]}, got {got}"


def parse_config(data: Any, *, origin: str = "config") -> RunConfig:
    """Validate a plain mapping into a ``RunConfig`` or raise ``ConfigError`` (one line)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    if data.get("deepspeed") is not None:
        from pipeline.deepspeed_configs import resolve

        try:  # checked here too, to name the problem without the whole mapping after it
            resolve(data["deepspeed"]) if isinstance(data["deepspeed"], (str, dict)) else None
        except ValueError as exc:
            raise ConfigError(f"deepspeed: {exc}") from None
    adapter = data.get("adapter")
    if isinstance(adapter, dict) and "method" not in adapter:
        data = {**data, "adapter": {"method": "lora", **adapter}}
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(_format_error(first, data)) from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``--set a.b.c=value`` overrides; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item}: empty key segment")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item}: value is not valid YAML ({exc.problem})") from None
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: '{part}' is a {type(child).__name__}, not a section")
            node = child
        node[parts[-1]] = value
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key written twice in one mapping is an error, not "last wins"."""

    def construct_mapping(self, node, deep=False):
        if any(k.tag == "tag:yaml.org,2002:merge" for k, _ in node.value):
            return super().construct_mapping(node, deep=deep)  # '<<' merges may override on purpose
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                first = seen[key]
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first at line {first.line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file, apply ``--set`` overrides and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(f"{path}: YAML syntax error at {where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML syntax error: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    apply_overrides(data, overrides or [])
    return parse_config(data, origin=str(path))
