"""The ``model`` section: the base every role shares, optionally quantized."""

from __future__ import annotations

from typing import Literal

from raypeft.pipeline.config.base import StrictModel


class QuantizationSpec(StrictModel):
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


class ModelSpec(StrictModel):
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

