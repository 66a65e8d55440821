"""LoRA and DoRA: config and the layers wrapping ``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Embedding``
and bitsandbytes' quantized ``Linear4bit`` / ``Linear8bitLt`` (QLoRA).

The update is ``W x + b + scaling * B A dropout(x)`` with ``scaling = alpha / r`` (or
``alpha / sqrt(r)`` for rsLoRA). Parameter and attribute names follow PEFT (``lora_A``,
``lora_B``, ``lora_embedding_A``, ``lora_embedding_B``, ``lora_magnitude_vector``,
``base_layer``) so that checkpoints are interchangeable with ``peft``.

DoRA (``use_dora=True``, Liu et al. 2024) re-parameterises the adapted weight as magnitude times
direction: ``W' = m * (W + s B A) / ||W + s B A||`` where the norm is taken per output feature
(the L2 norm of each row of the ``(out, in)`` matrix, PEFT's "column norm" of the paper's
``(in, out)`` layout) and is detached from the graph as the paper's section 4.3 and PEFT do. ``m``
starts at that norm, so a fresh DoRA adapter equals its LoRA counterpart. Forward adds
``(f - 1) * (W x) + f * s * B A x`` with ``f = m / norm`` to the base output, which is exactly
``W' x + b`` without materialising ``W'``.

On a quantized base the base output comes from bitsandbytes and the adapter runs in the layer's
compute dtype; merging dequantizes, merges and re-quantizes with the layer's own settings, and
unmerging restores the original quantized tensor exactly (see :mod:`adapters.quantization`).

Modules: :mod:`.config` (``LoraConfig`` and the layer factory), :mod:`.layer` (state and merging
shared by every LoRA wrapper), :mod:`.dora` (DoRA's maths), :mod:`.linear` and :mod:`.embedding`
(the wrappers' forwards), :mod:`.fused` (the fused Linear autograd node).
"""

from .config import LoraConfig
from .embedding import LoraEmbedding
from .layer import LoraLayer
from .linear import LoraLinear

__all__ = ["LoraConfig", "LoraEmbedding", "LoraLayer", "LoraLinear"]
