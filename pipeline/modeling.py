"""Loading the shared base model and putting an adapter on it.

``name_or_path: demo`` is the embedded Llama built by ``pipeline.demo``; anything else goes to
``transformers`` as a hub id or a local folder, so real users name real models. The same
functions build a weightless skeleton on the meta device, which lets the driver check
``target_modules`` against the real module names before Ray starts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, BitsAndBytesConfig,
                          PreTrainedModel, PreTrainedTokenizerBase)

from raypeft.adapters import AdapterConfig, AdapterModel, get_adapter_model
from raypeft.pipeline.config import AdapterSpec, ConfigError, ModelSpec
from raypeft.adapters.quantization import prepare_model_for_kbit_training
from raypeft.pipeline.demo import ensure_demo_assets, with_demo_template

DEMO_MODEL = "demo"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STORAGE = {**_DTYPES, "uint8": torch.uint8}


def resolve_model_path(spec: ModelSpec) -> str:
    """The path or hub id transformers should load; builds the demo assets on first use."""
    if spec.name_or_path == DEMO_MODEL:
        return str(ensure_demo_assets().model_dir)
    local = Path(spec.name_or_path).expanduser()
    return str(local.resolve()) if local.exists() else spec.name_or_path


def _auto_class(spec: ModelSpec):
    return AutoModelForSeq2SeqLM if spec.task_type == "SEQ_2_SEQ_LM" else AutoModelForCausalLM


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The tokenizer, with a pad token (many causal LMs ship none; eos stands in)."""
    path = spec.tokenizer or resolve_model_path(spec)
    tok = AutoTokenizer.from_pretrained(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ConfigError(f"model.tokenizer: {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    if spec.name_or_path == DEMO_MODEL and spec.tokenizer is None:
        tok = with_demo_template(tok)
    return tok


def quantization_config(spec: ModelSpec):
    """transformers' ``BitsAndBytesConfig`` for ``model.quantization`` (None without one)."""
    q = spec.quantization
    if q is None:
        return None
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=q.llm_int8_skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=_DTYPES[q.bnb_4bit_compute_dtype],
        bnb_4bit_quant_storage=_STORAGE[q.bnb_4bit_quant_storage],
        llm_int8_skip_modules=q.llm_int8_skip_modules,
    )


def load_base_model(spec: ModelSpec, device: torch.device | str = "cpu") -> PreTrainedModel:
    """Load the base weights once; every role of a stage is an adapter over this object.

    With ``quantization`` the linear layers load as bitsandbytes 4-/8-bit modules on ``device``
    (bitsandbytes runs them on CPU too) and the model is prepared for k-bit training: base
    frozen, norms and head in fp32, input embeddings' output requiring grad so gradient
    checkpointing reaches the adapters.
    """
    device = torch.device(device)
    quant = quantization_config(spec)
    kwargs: dict = {}
    if quant is not None:
        kwargs = {"quantization_config": quant, "device_map": {"": device.index if device.type == "cuda" else "cpu"}}
    model = _auto_class(spec).from_pretrained(
        resolve_model_path(spec),
        revision=spec.revision,
        dtype=_DTYPES[spec.dtype],
        trust_remote_code=spec.trust_remote_code,
        **kwargs,
    )
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing,
                                                keep_in_fp32="norms")
    else:
        model = model.to(device)
        if spec.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    return model


def skeleton_model(spec: ModelSpec) -> PreTrainedModel:
    """The architecture on the meta device: module names without loading any weight."""
    config = AutoConfig.from_pretrained(resolve_model_path(spec), revision=spec.revision,
                                        trust_remote_code=spec.trust_remote_code)
    with torch.device("meta"):
        return _auto_class(spec).from_config(config, trust_remote_code=spec.trust_remote_code)


def adapter_config(adapter: AdapterSpec, model: ModelSpec) -> AdapterConfig:
    """The library config for a YAML adapter block.

    Prompt tuning initialised from text needs the tokenizer that encodes that text: the
    model's own (``model.tokenizer`` or the model folder), as PEFT's ``tokenizer_name_or_path``.
    AdaLoRA without ``total_step`` gets a provisional one here; the training loop sets the
    stage's real step count before the first step (``pipeline.adapter_hooks``).
    """
    kwargs = adapter.adapter_kwargs()
    if kwargs.get("prompt_tuning_init") == "TEXT":  # the text-initialised prompt methods
        if not kwargs.get("prompt_tuning_init_text"):
            raise ConfigError("adapter.prompt_tuning_init_text: required when prompt_tuning_init is TEXT")
        kwargs["tokenizer_name_or_path"] = model.tokenizer or resolve_model_path(model)
    if "total_step" in kwargs and kwargs["total_step"] is None:  # AdaLoRA: the stage sets the real count
        kwargs["total_step"] = kwargs["tinit"] + kwargs["tfinal"] + 1
    try:
        return adapter.METHOD.config_class(
            task_type=model.task_type,
            base_model_name_or_path=model.name_or_path,
            **kwargs,
        )
    except (TypeError, ValueError) as exc:  # the library's own checks, as one config line
        raise ConfigError(f"adapter: {str(exc).splitlines()[0]}") from None


def attach_adapter(base: PreTrainedModel, adapter: AdapterSpec, model: ModelSpec, *,
                   init_dir: str | Path | None = None, adapter_name: str = "default") -> AdapterModel:
    """Wrap ``base`` with a trainable adapter: fresh from the YAML, or continued from ``init_dir``."""
    if init_dir is not None:
        return AdapterModel.from_pretrained(base, str(init_dir), adapter_name=adapter_name, is_trainable=True)
    return get_adapter_model(base, adapter_config(adapter, model), adapter_name=adapter_name)


def check_adapter_targets(adapter: AdapterSpec, model: ModelSpec) -> int | None:
    """Fail on the driver, before Ray starts, if the adapter cannot go on this base.

    Builds it on a weightless skeleton: an unknown ``target_modules`` entry, or a virtual-token
    method on a model whose config lacks what it needs, fails here instead of in every worker.
    Returns the adapter's trainable parameter count (``None`` when it continues a saved adapter),
    so preflight can refuse one too large to allocate (``preflight_checks.check_adapter_size``).
    """
    if adapter.init_from is not None:
        return None
    config = adapter_config(adapter, model)
    if getattr(config, "prompt_tuning_init", "RANDOM") != "RANDOM":
        config = config.copy(prompt_tuning_init="RANDOM")  # text/vocab init reads real embeddings
    skeleton = skeleton_model(model)
    try:
        built = get_adapter_model(skeleton, config)
    except ValueError as exc:
        message = str(exc).splitlines()[0]
        if message.startswith("target_modules:"):
            message = f"adapter.{message}"
        elif not message.startswith("adapter."):
            message = f"adapter.target_modules: {message}"
        raise ConfigError(message) from None
    trainable, _ = built.get_nb_trainable_parameters()
    return int(trainable)
