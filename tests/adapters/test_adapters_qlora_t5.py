"""QLoRA on an encoder-decoder (T5): the model's fp32-only modules and the fp32 hidden stream.

T5 is where the k-bit preparation used to break: with ``keep_in_fp32="norms"`` the norms made
the hidden states float32 while the relative position bias (an embedding table) stayed bf16, and
SDPA refused the bf16 bias next to float32 queries; and quantizing ``wo`` (listed in
``_keep_in_fp32_modules``) made T5's forward cast activations to the packed uint8 storage dtype.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

from raypeft.adapters import LoraConfig, get_adapter_model, prepare_model_for_kbit_training, quantize_linear_layers  # noqa: E402
from raypeft.adapters.quantization import is_quantized, keep_in_fp32_module_names  # noqa: E402


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    # d_model >= 64: bitsandbytes' CPU kernel packs 4-bit weights in blocks of 64.
    config = T5Config(vocab_size=96, d_model=64, d_ff=128, num_layers=2, num_heads=2, d_kv=32,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return T5ForConditionalGeneration(config).to(torch.bfloat16)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_quantize_linear_layers_honours_keep_in_fp32_modules() -> None:
    model = _t5()
    assert keep_in_fp32_module_names(model) == {"wo"}
    # Even with an explicit skip list, the model's own fp32-only modules stay unquantized.
    quantize_linear_layers(model, 4, compute_dtype=torch.bfloat16, skip_modules=["lm_head"])
    wo = [m for n, m in model.named_modules() if n.endswith(".wo")]
    wi = [m for n, m in model.named_modules() if n.endswith(".wi")]
    assert wo and all(type(m) is nn.Linear for m in wo)
    assert wi and all(is_quantized(m) for m in wi)
    assert type(model.lm_head) is nn.Linear


def test_t5_qlora_with_fp32_norms_trains_and_generates() -> None:
    model = _t5()
    tied = model.lm_head.weight is model.shared.weight
    quantize_linear_layers(model, 4, compute_dtype=torch.bfloat16)
    _quiet(prepare_model_for_kbit_training, model, use_gradient_checkpointing=True, keep_in_fp32="norms")
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert dtypes[bias] == torch.float32  # added to float32 scores: must be float32 too
    assert dtypes["encoder.block.0.layer.1.DenseReluDense.wo.weight"] == torch.float32
    assert dtypes["encoder.final_layer_norm.weight"] == torch.float32
    assert model.lm_head.weight.dtype == torch.float32
    # The input table stays bf16 unless the head shares it (Llama's untied case: test_adapters_qlora).
    assert model.shared.weight.dtype == (torch.float32 if tied else torch.bfloat16)

    wrapped = get_adapter_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                                  task_type="SEQ_2_SEQ_LM"))
    ids = torch.randint(2, 96, (4, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=2e-2)
    wrapped.train()
    losses = []
    for _ in range(8):
        loss = _quiet(wrapped, input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    wrapped.eval()
    out = _quiet(wrapped.generate, input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 4 and out.shape[1] <= 4


def test_pipeline_loads_a_4bit_t5_from_a_folder(tmp_path) -> None:
    """``model.quantization`` on a seq2seq base: transformers' loader + our k-bit preparation."""
    from raypeft.pipeline.config import parse_config
    from raypeft.pipeline.modeling import load_base_model

    _t5().save_pretrained(tmp_path / "t5")
    cfg = parse_config({"model": {"name_or_path": str(tmp_path / "t5"), "task_type": "SEQ_2_SEQ_LM",
                                  "dtype": "bfloat16", "quantization": {"bits": 4, "bnb_4bit_compute_dtype": "bfloat16"}},
                        "adapter": {"target_modules": ["q", "v"]}})
    base = _quiet(load_base_model, cfg.model)
    assert any(is_quantized(m) for m in base.modules())
    assert all(not is_quantized(m) for n, m in base.named_modules() if n.endswith(".wo"))
    ids = torch.randint(2, 96, (2, 6), generator=torch.Generator().manual_seed(2))
    wrapped = get_adapter_model(base, LoraConfig(r=4, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    loss = _quiet(wrapped, input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in wrapped.named_parameters() if "lora_A" in n
               or "lora_B" in n)
