"""LLaMA-Adapter (adaption prompts): zero-init gate, the formula by hand, files, PEFT interop both ways."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
import transformers

from raypeft.adapters import (
    AdaptedAttention,
    AdapterModel,
    AdaptionPromptConfig,
    LoraConfig,
    get_adapter_model,
    load_config,
)

peft = pytest.importorskip("peft")

TOL = 1e-5
GEN = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _open_gates(model, value: float = 0.5) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adaption_gate" in name:
                param.fill_(value)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ---------------------------------------------------------------------- zero init
def test_closed_gate_leaves_the_model_unchanged(llama, input_ids, fwd):
    expected = fwd(llama, input_ids)
    with torch.no_grad():
        expected_gen = llama.generate(input_ids=input_ids, **GEN)
    model = get_adapter_model(llama, AdaptionPromptConfig(adapter_len=4, adapter_layers=2))
    assert torch.equal(fwd(model, input_ids), expected)
    with torch.no_grad():
        assert torch.equal(model.generate(input_ids=input_ids, **GEN), expected_gen)
    prompts = [p for n, p in model.named_parameters() if "adaption_prompt" in n]
    assert prompts and all(p.abs().sum() > 0 for p in prompts)  # N(0, 1) prompts; only the gate is zero
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 2 * (4 * 32 + 1)


def test_only_the_top_layers_are_adapted(llama):
    model = get_adapter_model(llama, AdaptionPromptConfig(adapter_len=3, adapter_layers=1))
    layers = model.get_base_model().model.layers
    assert not isinstance(layers[0].self_attn, AdaptedAttention)
    assert isinstance(layers[1].self_attn, AdaptedAttention)
    assert model.peft_config["default"].target_modules == "self_attn"


# ---------------------------------------------------------------------- the formula
def test_attention_output_matches_hand_computation(llama_base):
    torch.manual_seed(0)
    model = get_adapter_model(copy.deepcopy(llama_base), AdaptionPromptConfig(adapter_len=3, adapter_layers=1))
    _open_gates(model, 0.7)
    wrapped = model.get_base_model().model.layers[1].self_attn
    attn = llama_base.model.layers[1].self_attn
    x = torch.randn(2, 5, 32)
    cos, sin = llama_base.model.rotary_emb(x, torch.arange(5)[None].expand(2, -1))
    with torch.no_grad():
        ours = wrapped(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)[0]
        base_out = attn(hidden_states=x, position_embeddings=(cos, sin), attention_mask=None)[0]
        heads, kv_heads, d = 4, 2, 8
        q = (x @ attn.q_proj.weight.T).view(2, 5, heads, d).transpose(1, 2)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        prompt = wrapped.adaption_prompt["default"][0]  # (3, 32)
        k = (prompt @ attn.k_proj.weight.T).view(3, kv_heads, d).transpose(0, 1).repeat_interleave(2, dim=0)
        v = (prompt @ attn.v_proj.weight.T).view(3, kv_heads, d).transpose(0, 1).repeat_interleave(2, dim=0)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (2, heads, 5, 3)
        gated = 0.7 * probs @ v  # (2, heads, 5, d)
        expected = base_out + gated.transpose(1, 2).reshape(2, 5, heads * d) @ attn.o_proj.weight.T
    assert torch.allclose(ours, expected, atol=1e-5)
    assert (ours - base_out).abs().max() > 1e-3


def test_o_proj_bias_is_not_added_twice():
    """With ``attention_bias`` the closed gate still gives the base output (PEFT 0.21 adds o_proj's bias again)."""
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    torch.manual_seed(0)
    base = _quiet(transformers.LlamaForCausalLM, cfg).eval()
    with torch.no_grad():
        for layer in base.model.layers:
            layer.self_attn.o_proj.bias.normal_()
    ids = torch.randint(1, 100, (2, 6))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        model = get_adapter_model(copy.deepcopy(base), AdaptionPromptConfig(adapter_len=2, adapter_layers=2))
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-6)


# ---------------------------------------------------------------------- files and interop
def test_save_load_round_trip(llama_base, input_ids, fwd, tmp_path):
    torch.manual_seed(1)
    model = get_adapter_model(copy.deepcopy(llama_base), AdaptionPromptConfig(adapter_len=4, adapter_layers=2))
    _open_gates(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADAPTION_PROMPT" and saved["adapter_len"] == 4 and saved["adapter_layers"] == 2
    assert set(model.adapter_state_dict()) == {
        f"base_model.model.model.layers.{i}.self_attn.adaption_{k}" for i in (0, 1) for k in ("prompt", "gate")
    }
    assert isinstance(load_config(tmp_path), AdaptionPromptConfig)
    loaded = AdapterModel.from_pretrained(copy.deepcopy(llama_base), tmp_path)
    adapted = fwd(model, input_ids)
    assert torch.equal(fwd(loaded, input_ids), adapted)
    assert (adapted - fwd(llama_base, input_ids)).abs().max() > 1e-3


def test_raypeft_to_peft(llama_base, input_ids, fwd, tmp_path):
    torch.manual_seed(1)
    ours = get_adapter_model(copy.deepcopy(llama_base), AdaptionPromptConfig(adapter_len=4, adapter_layers=1))
    _open_gates(ours)
    ours.save_pretrained(tmp_path)
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(llama_base), str(tmp_path)).eval()
    adapted = fwd(ours, input_ids)
    assert (adapted - fwd(llama_base, input_ids)).abs().max() > 1e-3
    assert (fwd(theirs, input_ids) - adapted).abs().max() <= TOL
    with torch.no_grad():
        assert torch.equal(theirs.generate(input_ids=input_ids, **GEN), ours.generate(input_ids=input_ids, **GEN))


def test_peft_to_raypeft(llama_base, input_ids, fwd, tmp_path):
    torch.manual_seed(1)
    config = peft.AdaptionPromptConfig(adapter_len=3, adapter_layers=2, task_type="CAUSAL_LM")
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(llama_base), config).eval()
    _open_gates(theirs, 0.3)
    _quiet(theirs.save_pretrained, str(tmp_path))
    ours = AdapterModel.from_pretrained(copy.deepcopy(llama_base), tmp_path).eval()
    expected = fwd(theirs, input_ids)
    assert (expected - fwd(llama_base, input_ids)).abs().max() > 1e-3
    assert (fwd(ours, input_ids) - expected).abs().max() <= TOL
    with torch.no_grad():
        assert torch.equal(ours.generate(input_ids=input_ids, **GEN), theirs.generate(input_ids=input_ids, **GEN))


# ---------------------------------------------------------------------- adapters, merging, errors
def test_several_adapters_switch_and_merge_is_refused(llama_base, input_ids, fwd):
    torch.manual_seed(0)
    model = get_adapter_model(copy.deepcopy(llama_base), AdaptionPromptConfig(adapter_len=2, adapter_layers=2))
    model.add_adapter("other", AdaptionPromptConfig(adapter_len=5, adapter_layers=1))
    _open_gates(model)
    first = fwd(model, input_ids)
    model.set_adapter("other")
    other = fwd(model, input_ids)
    assert (first - other).abs().max() > 1e-3
    model.delete_adapter("other")
    assert torch.equal(fwd(model, input_ids), first)
    with pytest.raises(ValueError, match="AdaptionPromptConfig adapter 'default' cannot be merged"):
        model.merge_adapter()
    plain = model.unload()
    assert not any(isinstance(m, AdaptedAttention) for m in plain.modules())
    assert torch.equal(fwd(plain, input_ids), fwd(llama_base, input_ids))


def test_errors(llama, gpt2):
    with pytest.raises(ValueError, match="adapter_len must be a positive integer"):
        AdaptionPromptConfig(adapter_len=0, adapter_layers=1)
    with pytest.raises(ValueError, match="adapter_layers must be a positive integer"):
        AdaptionPromptConfig(adapter_len=2)
    with pytest.raises(ValueError, match="adapter_layers=3 but the model has only 2"):
        get_adapter_model(copy.deepcopy(llama), AdaptionPromptConfig(adapter_len=2, adapter_layers=3))
    with pytest.raises(ValueError, match="no module is named 'attention'"):
        get_adapter_model(copy.deepcopy(llama), AdaptionPromptConfig(adapter_len=2, adapter_layers=1,
                                                                     target_modules="attention"))
    with pytest.raises(TypeError, match="needs a Llama-style attention module"):
        get_adapter_model(gpt2, AdaptionPromptConfig(adapter_len=2, adapter_layers=1, target_modules="attn"))
    model = get_adapter_model(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="cannot be combined with adapters inside it"):
        model.add_adapter("prompt", AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    assert list(model.peft_config) == ["default"]


def test_training_opens_the_gate(llama):
    torch.manual_seed(0)
    model = get_adapter_model(llama, AdaptionPromptConfig(adapter_len=4, adapter_layers=2))
    model.train()
    batch = torch.randint(1, 100, (4, 10), generator=torch.Generator().manual_seed(3))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=0.05)
    losses = []
    for _ in range(12):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    gates = [p for n, p in model.named_parameters() if "adaption_gate" in n]
    assert all(g.abs().item() > 0 for g in gates)
    assert losses[-1] < losses[0]
