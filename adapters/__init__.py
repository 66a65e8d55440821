"""raypeft's own parameter-efficient fine-tuning library, checkpoint-compatible with PEFT.

Methods: LoRA (with DoRA, and on bitsandbytes 4-/8-bit bases), and the virtual-token methods prompt tuning, P-tuning and prefix tuning.

Depends on torch, safetensors and (for GPT-2's ``Conv1D``) transformers -- never on ``peft``.
"""

from .config import AdapterConfig, TaskType, config_class_for, load_config, register_config
from .layer import AdapterLayer
from .lora import LoraConfig, LoraEmbedding, LoraLayer, LoraLinear
from .model import AdapterModel, get_adapter_model
from .modules_to_save import ModulesToSaveWrapper
from .p_tuning import PromptEncoder, PromptEncoderConfig
from .prefix_tuning import PrefixEncoder, PrefixTuningConfig
from .prompt_tuning import PromptEmbedding, PromptTuningConfig
from .quantization import prepare_model_for_kbit_training, quantize_linear_layers
from .serialization import LoadResult
from .virtual_tokens import PromptLearningConfig

__all__ = [
    "AdapterConfig",
    "AdapterLayer",
    "AdapterModel",
    "LoadResult",
    "LoraConfig",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "ModulesToSaveWrapper",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptLearningConfig",
    "PromptTuningConfig",
    "TaskType",
    "config_class_for",
    "get_adapter_model",
    "load_config",
    "prepare_model_for_kbit_training",
    "quantize_linear_layers",
    "register_config",
]
