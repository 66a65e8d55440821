"""raypeft's own parameter-efficient fine-tuning library, checkpoint-compatible with PEFT.

Methods: LoRA (with DoRA, and on bitsandbytes 4-/8-bit bases), IA3, LoHa, LoKr, AdaLoRA, bottleneck
adapters, LLaMA-Adapter, and the virtual-token methods prompt tuning, multitask prompt tuning,
P-tuning and prefix tuning. Several adapters can serve one batch: ``model(..., adapter_names=[...])``
runs each row with its own adapter (:mod:`adapters.mixed_batch`).

Depends on torch, safetensors and (for GPT-2's ``Conv1D``) transformers -- never on ``peft``.
"""

from .adalora import (
    AdaLoraConfig,
    AdaLoraLayer,
    RankAllocator,
    orthogonal_regularization,
    update_and_allocate,
)
from .bottleneck import BottleneckConfig, BottleneckLayer
from .combine import add_weighted_adapter
from .config import AdapterConfig, TaskType, config_class_for, load_config, register_config
from .ia3 import IA3Config, IA3Layer
from .layer import AdapterLayer
from .llama_adapter import AdaptedAttention, AdaptionPromptConfig
from .loha import LoHaConfig, LoHaLayer
from .lokr import LoKrConfig, LoKrLayer
from .lora import LoraConfig, LoraEmbedding, LoraLayer, LoraLinear
from .methods import METHODS, AdapterMethod, method_for_peft_type, method_named, method_names
from .model import AdapterModel, get_adapter_model
from .modules_to_save import ModulesToSaveWrapper
from .multitask_prompt_tuning import MultitaskPromptEmbedding, MultitaskPromptTuningConfig
from .p_tuning import PromptEncoder, PromptEncoderConfig
from .prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .prompt_tuning import PromptEmbedding, PromptTuningConfig
from .quantization import prepare_model_for_kbit_training, quantize_linear_layers
from .routing import BASE_ADAPTER
from .serialization import LoadResult
from .virtual_tokens import PromptLearningConfig

__all__ = [
    "AdaLoraConfig",
    "AdaLoraLayer",
    "AdaptedAttention",
    "AdaptionPromptConfig",
    "AdapterConfig",
    "AdapterLayer",
    "AdapterMethod",
    "AdapterModel",
    "BASE_ADAPTER",
    "BottleneckConfig",
    "BottleneckLayer",
    "IA3Config",
    "IA3Layer",
    "LoHaConfig",
    "LoHaLayer",
    "LoKrConfig",
    "LoKrLayer",
    "LoadResult",
    "LoraConfig",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "METHODS",
    "ModulesToSaveWrapper",
    "MultitaskPromptEmbedding",
    "MultitaskPromptTuningConfig",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "RankAllocator",
    "TaskType",
    "add_weighted_adapter",
    "config_class_for",
    "get_adapter_model",
    "load_config",
    "method_for_peft_type",
    "method_named",
    "method_names",
    "orthogonal_regularization",
    "prepare_model_for_kbit_training",
    "quantize_linear_layers",
    "register_config",
    "update_and_allocate",
]
