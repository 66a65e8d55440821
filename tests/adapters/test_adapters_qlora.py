"""QLoRA: LoRA/DoRA on bitsandbytes 4-bit and 8-bit bases, on CPU (bitsandbytes >= 0.49 runs there).

The tiny Llama here is wider than conftest's (hidden 64, key/value width 32): bitsandbytes' CPU
kernel repacks 4-bit weights on the first eval-mode no-grad forward and needs ``in_features`` >=
the 64-wide quantization block and ``out_features`` divisible by 32.

Tolerances:
* peft interop: 1e-5 -- both libraries run the same bitsandbytes kernels on bit-identical
  quantized weights; only the adapter arithmetic's order can differ;
* merging into a 4-bit base re-rounds ``W + dW`` to 4 bits once, so merged-vs-unmerged logits
  differ by about the base's own quantization error: we allow twice the error that quantizing the
  (adapted) model introduces, measured on the same model and input, and require it to be well
  below the adapter's own effect so the merge demonstrably carried the adapter.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from raypeft.adapters import AdapterModel, LoraConfig, LoraLinear, get_adapter_model  # noqa: E402
from raypeft.adapters.quantization import (  # noqa: E402
    dense_weight,
    prepare_model_for_kbit_training,
    quant_kind,
    quantize_linear_layers,
)

EXACT = 1e-5
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _config(**overrides):
    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


@pytest.fixture(scope="module")
def fp_llama():
    torch.manual_seed(0)
    return _quiet(transformers.LlamaForCausalLM, _config()).eval()


@pytest.fixture
def ids():
    return torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(5))


def _q(fp_model, bits=4, **kwargs):
    return _quiet(quantize_linear_layers, copy.deepcopy(fp_model), bits, **kwargs).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _trained_like(model: nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Give B (and DoRA magnitudes) values a short training run would: a small, non-zero update."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.rand(param.shape, generator=gen))


def _quantized_layers(model):
    return {n: m for n, m in model.named_modules() if quant_kind(m) is not None}


def _settings(layer: nn.Module) -> tuple:
    """What re-quantizing after a merge must preserve."""
    w = layer.weight
    return (w.quant_type, w.blocksize, w.compress_statistics, w.quant_storage, layer.compute_dtype)


def _checkpointing(model: nn.Module) -> bool:
    """transformers >= 5.20 calls it ``is_activation_checkpointing`` (the old name warns there)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(model.is_gradient_checkpointing)


def _bits(weight: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a quantized weight (a bf16 ``quant_storage`` view can hold NaN patterns)."""
    return weight.data.contiguous().view(torch.uint8)


# ---------------------------------------------------------------------- optional dependency
def test_adapters_import_and_lora_work_without_bitsandbytes():
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"  # makes 'import bitsandbytes' fail
        "import torch, adapters\n"
        "from raypeft.adapters.quantization import bnb_available, quant_kind, quantize_linear_layers\n"
        "assert not bnb_available()\n"
        "lin = torch.nn.Linear(4, 4)\n"
        "assert quant_kind(lin) is None\n"
        "layer = adapters.LoraConfig(r=2, init_lora_weights=False).create_layer(lin, 'default', 'x')\n"
        "layer.set_adapter('default'); layer.merge(); layer.unmerge()\n"
        "try:\n"
        "    quantize_linear_layers(torch.nn.Sequential(lin), 4)\n"
        "except ImportError as exc:\n"
        "    assert 'bitsandbytes' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('expected ImportError')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


# ---------------------------------------------------------------------- building a quantized base
@pytest.mark.parametrize("bits", [4, 8])
def test_helper_equals_transformers_bitsandbytes_loading(bits, fp_llama, ids, tmp_path):
    """quantize_linear_layers gives the same layers and quantized values as from_pretrained with a
    BitsAndBytesConfig (which also runs on CPU with bitsandbytes 0.50)."""
    _quiet(fp_llama.save_pretrained, tmp_path)
    if bits == 4:
        bnb_config = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    else:
        bnb_config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    loaded = _quiet(
        transformers.AutoModelForCausalLM.from_pretrained,
        str(tmp_path),
        quantization_config=bnb_config,
        device_map="cpu",
        dtype=torch.float32,
    ).eval()
    ours = _q(fp_llama, bits)
    theirs_layers, ours_layers = _quantized_layers(loaded), _quantized_layers(ours)
    assert set(theirs_layers) == set(ours_layers) and "lm_head" not in ours_layers
    assert len(ours_layers) == 14  # 7 linears x 2 blocks
    for name, layer in ours_layers.items():
        other = theirs_layers[name]
        assert type(layer) is type(other)
        assert torch.equal(layer.weight.data, other.weight.data)
        assert torch.equal(dense_weight(layer), dense_weight(other))
    assert torch.equal(_logits(ours, ids), _logits(loaded, ids))
    assert getattr(ours, f"is_loaded_in_{bits}bit") is True


# ---------------------------------------------------------------------- wrapping
QUANT_CASES = {
    "nf4-double-fp32": dict(bits=4, quant_type="nf4", double_quant=True, compute_dtype=torch.float32),
    "fp4-bf16-storage": dict(
        bits=4, quant_type="fp4", double_quant=False, compute_dtype=torch.bfloat16, quant_storage=torch.bfloat16
    ),
    "int8": dict(bits=8),
}


@pytest.mark.parametrize("case", sorted(QUANT_CASES))
def test_all_linear_wraps_quantized_layers_and_adds_lora(case, fp_llama):
    kwargs = dict(QUANT_CASES[case])
    bits = kwargs.pop("bits")
    model = _q(fp_llama, bits, **kwargs)
    quantized = _quantized_layers(model)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    wrapped = get_adapter_model(model, config)
    layers = {n: m for n, m in wrapped.get_base_model().named_modules() if isinstance(m, LoraLinear)}
    assert set(layers) == set(quantized)  # every bnb linear, and not the full-precision lm_head
    expected_dtype = kwargs.get("compute_dtype", torch.float32)
    for layer in layers.values():
        assert quant_kind(layer.base_layer) == f"{bits}bit"
        assert layer.lora_A["default"].weight.dtype == expected_dtype  # adapters run in the compute dtype
        assert layer.lora_A["default"].weight.requires_grad
    assert not any(p.requires_grad for n, p in wrapped.named_parameters() if "lora_" not in n)

    layer = layers["model.layers.0.mlp.up_proj"]
    x = torch.randn(3, 64)
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    with torch.no_grad():
        out, base = layer(x), layer.base_layer(x)
    tol = 2e-2 if expected_dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(out - base, 2.0 * (x @ a.T @ b.T), atol=tol, rtol=tol)
    assert out.dtype == x.dtype


# ---------------------------------------------------------------------- training
def _train(model: nn.Module, ids: torch.Tensor, steps: int = 20) -> tuple[AdapterModel, list[float]]:
    torch.manual_seed(2)
    wrapped = get_adapter_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    wrapped.train()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in wrapped.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return wrapped, losses


def test_qlora_training_reduces_loss_like_lora_and_leaves_the_base_untouched(fp_llama, ids):
    model = prepare_model_for_kbit_training(_q(fp_llama, 4))
    before = {n: _bits(m.weight).clone() for n, m in _quantized_layers(model).items()}
    wrapped, losses = _train(model, ids)
    # this tiny random model's frozen head caps how far the loss can fall (about 3.6 from 4.9)
    assert losses[-1] < losses[0] - 1.0, losses
    _, fp_losses = _train(copy.deepcopy(fp_llama), ids)
    assert abs(losses[-1] - fp_losses[-1]) < 0.1, (losses[-1], fp_losses[-1])  # QLoRA tracks LoRA
    for name, layer in _quantized_layers(wrapped.get_base_model()).items():
        assert torch.equal(_bits(layer.weight), before[name.replace(".base_layer", "")])


# ---------------------------------------------------------------------- interop with peft
INTEROP = {
    "lora-nf4": dict(use_dora=False),
    "dora-nf4": dict(use_dora=True),
    "lora-int8": dict(use_dora=False, bits=8),
}


@pytest.mark.parametrize("case", sorted(INTEROP))
def test_adapter_moves_between_raypeft_and_peft_on_the_same_quantized_model(case, fp_llama, ids, tmp_path):
    kwargs = dict(INTEROP[case])
    bits = kwargs.pop("bits", 4)
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", **kwargs)
    # peft's DoRA dequantizes with bitsandbytes' standard layout only, which the CPU kernel's
    # eval-mode repacking changes, so DoRA cases compare in train mode (no dropout: same outputs)
    mode = "train" if kwargs.get("use_dora") else "eval"

    torch.manual_seed(1)
    ours = get_adapter_model(_q(fp_llama, bits), LoraConfig(**config))
    _trained_like(ours)
    ours.save_pretrained(tmp_path / "ours")
    theirs = _quiet(peft.PeftModel.from_pretrained, _q(fp_llama, bits), str(tmp_path / "ours"))
    getattr(ours, mode)(), getattr(theirs, mode)()
    out = _logits(ours, ids)
    assert (out - _logits(_q(fp_llama, bits), ids)).abs().max() > 1e-2
    assert (out - _logits(theirs, ids)).abs().max() <= EXACT

    theirs = _quiet(peft.get_peft_model, _q(fp_llama, bits), peft.LoraConfig(**config))
    _trained_like(theirs, seed=3)
    _quiet(theirs.save_pretrained, str(tmp_path / "theirs"))
    back = _quiet(AdapterModel.from_pretrained, _q(fp_llama, bits), tmp_path / "theirs")
    getattr(back, mode)(), getattr(theirs, mode)()
    assert (_logits(back, ids) - _logits(theirs, ids)).abs().max() <= EXACT


def _packed(layer: nn.Module) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def test_dense_weight_reads_the_cpu_packed_layout(fp_llama):
    """bitsandbytes repacks a 4-bit weight for its CPU kernel on the first eval-mode no-grad forward
    (CPUs with AVX512-BF16); dequantizing must read that layout too."""
    layer = _q(fp_llama, 4).model.layers[0].mlp.up_proj
    before = dense_weight(layer).clone()
    x = torch.randn(5, 64)
    with torch.no_grad():
        out = layer.eval()(x)
    if not _packed(layer):
        pytest.skip("this CPU's bitsandbytes kernel does not repack 4-bit weights")
    after = dense_weight(layer)
    # the repacked block scales are bf16: the weight is the same up to bf16 rounding of the scales
    assert torch.allclose(after, before, rtol=1e-2, atol=1e-6)
    assert (after - before).abs().max() > 0 or torch.equal(after, before)
    assert torch.allclose(out, x @ after.T, rtol=2e-2, atol=2e-2)


def test_qdora_eval_uses_the_packed_weight_correctly(fp_llama, ids):
    """DoRA's norms dequantize the base every forward; after repacking, eval outputs may differ
    from the un-packed train-mode path only by the CPU kernel's own rounding (peft's DoRA gets
    about 0.1 here, as it dequantizes the repacked bytes as if they were standard)."""
    fresh = _q(fp_llama, 4).train()
    unpacked_base = _logits(fresh, ids)
    packed_base = _logits(fresh.eval(), ids)
    kernel_error = (unpacked_base - packed_base).abs().max()

    torch.manual_seed(1)
    model = get_adapter_model(_q(fp_llama, 4), LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    _trained_like(model)
    train_out = _logits(model.train(), ids)
    eval_out = _logits(model.eval(), ids)
    if not any(_packed(m) for m in _quantized_layers(model).values()):
        assert (eval_out - train_out).abs().max() <= EXACT
        return
    assert (eval_out - train_out).abs().max() <= 3 * kernel_error + 1e-5, (kernel_error,)


# ---------------------------------------------------------------------- merging
@pytest.mark.parametrize("bits,use_dora", [(4, False), (4, True), (8, False), (8, True)])
def test_merge_into_quantized_base_is_within_quantization_error(bits, use_dora, fp_llama, ids):
    config = LoraConfig(r=8, target_modules="all-linear", use_dora=use_dora)
    full = get_adapter_model(copy.deepcopy(fp_llama), config)
    _trained_like(full)
    model = get_adapter_model(_q(fp_llama, bits), config)
    model.load_adapter_state_dict(full.adapter_state_dict())
    model.eval()
    quantization_error = (_logits(full, ids) - _logits(model, ids)).abs().max()

    layers = _quantized_layers(model.get_base_model())
    original = {n: (type(m.weight), _bits(m.weight).clone(), quant_kind(m)) for n, m in layers.items()}
    settings = {n: _settings(m) for n, m in layers.items() if bits == 4}
    unmerged = _logits(model, ids)
    with model.disable_adapter():
        base_only = _logits(model, ids)
    model.merge_adapter()
    merged = _logits(model, ids)
    merge_error = (merged - unmerged).abs().max()
    assert merge_error <= 2 * quantization_error, (float(merge_error), float(quantization_error))
    assert merge_error < 0.5 * (unmerged - base_only).abs().max()
    with model.disable_adapter():  # the reference policy of a merged model is the exact base
        assert torch.equal(_logits(model, ids), base_only)
    assert torch.equal(_logits(model, ids), merged)  # re-merged on exit, deterministically
    for name, layer in _quantized_layers(model.get_base_model()).items():
        assert quant_kind(layer) == original[name][2]  # still quantized, same kind
        if bits == 4:
            assert _settings(layer) == settings[name]

    model.unmerge_adapter()  # the original quantized tensors come back bit for bit
    for name, layer in _quantized_layers(model.get_base_model()).items():
        assert torch.equal(_bits(layer.weight), original[name][1])
    assert torch.equal(_logits(model, ids), unmerged)


def test_merge_and_unload_keeps_a_4bit_model(fp_llama, ids):
    model = get_adapter_model(_q(fp_llama, 4), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    _trained_like(model)
    model.eval()
    model.merge_adapter()
    merged = _logits(model, ids)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, LoraLinear) for m in plain.modules())
    assert isinstance(plain.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert torch.equal(_logits(plain, ids), merged)


def test_saving_writes_only_the_adapter(fp_llama, ids, tmp_path):
    model = get_adapter_model(_q(fp_llama, 4), LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    _trained_like(model)
    model.eval().save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved and all(".lora_" in k for k in saved)
    n_adapter = sum(t.numel() for t in saved.values())
    trainable, _ = model.get_nb_trainable_parameters()
    assert n_adapter == trainable
    reloaded = AdapterModel.from_pretrained(_q(fp_llama, 4), tmp_path).eval()
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))


# ---------------------------------------------------------------------- k-bit preparation
def test_prepare_model_for_kbit_training_effects(fp_llama, ids):
    bf16 = copy.deepcopy(fp_llama).to(torch.bfloat16)
    model = _q(bf16, 4, compute_dtype=torch.bfloat16, quant_storage=torch.bfloat16)
    model.model.embed_tokens.weight.requires_grad_(True)
    quantized_before = {n: (m.weight.dtype, _bits(m.weight).clone()) for n, m in _quantized_layers(model).items()}
    prepare_model_for_kbit_training(model)

    assert not any(p.requires_grad for p in model.parameters())  # the base is frozen
    for name, param in model.named_parameters():
        layer_name = name.rsplit(".", 1)[0]
        if layer_name in quantized_before and name.endswith(".weight"):
            dtype, data = quantized_before[layer_name]
            assert param.dtype == dtype and torch.equal(_bits(param), data)  # quantized tensors untouched
        else:
            assert param.dtype == torch.float32, name  # norms, embeddings, head: fp32
    assert _checkpointing(model)
    assert model.model.layers[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    assert model.get_input_embeddings()(ids).requires_grad

    # with adapters: checkpointed blocks still deliver gradients to the LoRA tensors
    wrapped = get_adapter_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    wrapped.train()
    wrapped(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in wrapped.named_parameters() if "lora_B" in n]  # A gets none while B is 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_prepare_keep_in_fp32_norms_only(fp_llama):
    model = _q(copy.deepcopy(fp_llama).to(torch.bfloat16), 4, compute_dtype=torch.bfloat16)
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False, keep_in_fp32="norms")
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert not _checkpointing(model)
    with pytest.raises(ValueError, match="keep_in_fp32"):
        prepare_model_for_kbit_training(model, keep_in_fp32="some")


# ---------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_on_cuda_bf16_compute(use_dora, fp_llama, ids, tmp_path):
    """The configuration real runs use: NF4, double quantization, bf16 compute and storage, fp32
    adapters under bf16 autocast, on GPU."""
    device = torch.device("cuda")

    def prepared():
        bf16 = copy.deepcopy(fp_llama).to(device=device, dtype=torch.bfloat16)
        model = _q(bf16, 4, compute_dtype=torch.bfloat16, quant_storage=torch.bfloat16)
        return prepare_model_for_kbit_training(model)

    ids = ids.to(device)
    config = LoraConfig(r=8, target_modules="all-linear", use_dora=use_dora)
    model = get_adapter_model(prepared(), config, adapter_dtype=torch.float32)
    assert all(p.device.type == "cuda" for p in model.parameters())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    model.eval()
    unmerged = _logits(model, ids)
    with model.disable_adapter():
        base_only = _logits(model, ids)
    effect = (unmerged - base_only).abs().max()

    model.save_pretrained(tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, prepared(), str(tmp_path)).eval()
    interop_error = (unmerged - _logits(theirs, ids)).abs().max()
    print(f"cuda use_dora={use_dora}: losses {losses[0]:.3f}->{losses[-1]:.3f}, adapter effect {effect:.4f}, "
          f"peft diff {interop_error:.2e}")
    assert interop_error <= 1e-3  # same kernels on the same bytes (0.0 measured on an H100)

    original = {n: _bits(m.weight).clone() for n, m in _quantized_layers(model).items()}
    model.merge_adapter()
    merge_error = (_logits(model, ids) - unmerged).abs().max()
    print(f"cuda use_dora={use_dora}: merge error {merge_error:.4f}")
    assert merge_error < 0.5 * effect
    model.unmerge_adapter()
    for name, layer in _quantized_layers(model).items():
        assert torch.equal(_bits(layer.weight), original[name])
    assert torch.equal(_logits(model, ids), unmerged)
