"""raypeft's own parameter-efficient fine-tuning library (LoRA), checkpoint-compatible with PEFT.

Depends on torch, safetensors and (for GPT-2's ``Conv1D``) transformers -- never on ``peft``.
"""

from .config import AdapterConfig, TaskType, config_class_for, load_config, register_config
from .layer import AdapterLayer
from .lora import LoraConfig, LoraEmbedding, LoraLayer, LoraLinear
from .model import AdapterModel, get_adapter_model
from .modules_to_save import ModulesToSaveWrapper
from .serialization import LoadResult

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
    "TaskType",
    "config_class_for",
    "get_adapter_model",
    "load_config",
    "register_config",
]
