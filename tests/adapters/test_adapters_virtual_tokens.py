"""Virtual-token methods (prompt tuning, P-tuning, prefix tuning): math, generation, files, peft interop."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
import transformers
from transformers import DynamicCache

from raypeft.adapters import (
    AdapterModel,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_adapter_model,
    load_config,
)
from raypeft.adapters.virtual_tokens import cache_name

peft = pytest.importorskip("peft")

TOL = 1e-5
NVT = 3
NEW = 4  # tokens to generate

# name -> (our config, peft config) kwargs; P-tuning/prefix with their heads, so saving collapses them
METHODS = {
    "prompt": (PromptTuningConfig, "PromptTuningConfig", {}),
    "ptuning_mlp": (PromptEncoderConfig, "PromptEncoderConfig", {"encoder_hidden_size": 16}),
    "ptuning_lstm": (
        PromptEncoderConfig,
        "PromptEncoderConfig",
        {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8, "encoder_num_layers": 1},
    ),
    "prefix": (PrefixTuningConfig, "PrefixTuningConfig", {}),
    "prefix_projection": (PrefixTuningConfig, "PrefixTuningConfig", {"prefix_projection": True, "encoder_hidden_size": 16}),
}
GEN_METHODS = ["prompt", "ptuning_mlp", "prefix"]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def ours_config(method, **extra):
    cls, _, kwargs = METHODS[method]
    return cls(num_virtual_tokens=NVT, **kwargs, **extra)


def peft_config(method, **extra):
    _, name, kwargs = METHODS[method]
    return getattr(peft, name)(num_virtual_tokens=NVT, **kwargs, **extra)


def wrap(base, method, seed=1, **extra):
    torch.manual_seed(seed)
    return _quiet(get_adapter_model, copy.deepcopy(base), ours_config(method, **extra)).eval()


@pytest.fixture(scope="module")
def qwen2_base():
    cfg = transformers.Qwen2Config(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    return _quiet(transformers.Qwen2ForCausalLM, cfg).eval()


@pytest.fixture
def bases(llama_base, gpt2_base, t5_base, qwen2_base):
    return {"llama": llama_base, "gpt2": gpt2_base, "t5": t5_base, "qwen2": qwen2_base}


def _inputs(name, input_ids):
    kw = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if name == "t5":
        kw["decoder_input_ids"] = input_ids[:, :4]
    return kw


def _logits(model, **kw):
    with torch.no_grad():
        return model(**kw).logits


def _greedy(model, input_ids, attention_mask=None, **kw):
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        return _quiet(
            model.generate, input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW,
            do_sample=False, pad_token_id=0, **kw,
        )


# ---------------------------------------------------------------------- config
def test_configs_registered_and_sized_like_peft(llama_base, gpt2_base, tmp_path):
    model = wrap(llama_base, "prefix")
    cfg = model.peft_config["default"]
    # GQA: the prefix holds keys/values of the 2 kv heads (head_dim 8), as peft 0.21 sizes it
    assert (cfg.token_dim, cfg.num_attention_heads, cfg.num_layers) == (16, 2, 2)
    assert cfg.encoder_hidden_size == 16 and cfg.task_type == "CAUSAL_LM" and cfg.num_transformer_submodules == 1
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(llama_base), peft_config("prefix", task_type="CAUSAL_LM"))
    assert theirs.peft_config["default"].token_dim == 16 and theirs.peft_config["default"].num_attention_heads == 2
    prompt = wrap(llama_base, "prompt").peft_config["default"]
    assert (prompt.token_dim, prompt.num_attention_heads) == (32, 4)  # GQA sizing is prefix-only
    gpt2 = wrap(gpt2_base, "ptuning_mlp").peft_config["default"]
    assert (gpt2.token_dim, gpt2.num_attention_heads, gpt2.num_layers) == (32, 4, 2)

    for method, peft_type in [("prompt", "PROMPT_TUNING"), ("ptuning_mlp", "P_TUNING"), ("prefix", "PREFIX_TUNING")]:
        out = tmp_path / method
        wrap(llama_base, method).save_pretrained(out)
        data = json.loads((out / "adapter_config.json").read_text())
        assert data["peft_type"] == peft_type and data["inference_mode"] is True
        assert type(load_config(out)) is type(ours_config(method))

    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PromptTuningConfig()
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    with pytest.raises(ValueError, match="encoder_reparameterization_type"):
        PromptEncoderConfig(num_virtual_tokens=2, encoder_reparameterization_type="GRU")


# ---------------------------------------------------------------------- forward math
def test_prompt_tuning_forward_equals_manual_concat(llama_base, input_ids):
    model = wrap(llama_base, "prompt")
    mask = torch.ones_like(input_ids)
    mask[1, :2] = 0
    labels = input_ids.clone()
    out = _quiet(model, input_ids=input_ids, attention_mask=mask, labels=labels)
    virtual = model.prompt_encoder["default"].embedding.weight.detach()
    embeds = llama_base.get_input_embeddings()(input_ids)
    full = torch.cat((virtual.unsqueeze(0).expand(2, -1, -1), embeds), dim=1)
    full_mask = torch.cat((torch.ones(2, NVT, dtype=mask.dtype), mask), dim=1)
    full_labels = torch.cat((torch.full((2, NVT), -100), labels), dim=1)
    with torch.no_grad():
        ref = llama_base(inputs_embeds=full, attention_mask=full_mask, labels=full_labels)
    assert out.logits.shape == (2, NVT + input_ids.shape[1], 100)
    assert (out.logits.detach() - ref.logits).abs().max() <= TOL
    assert abs(out.loss.item() - ref.loss.item()) <= TOL
    with model.disable_adapter():
        assert torch.allclose(_logits(model, input_ids=input_ids), _logits(llama_base, input_ids=input_ids))


def _explicit_prefix_cache(model, batch):
    """The prefix as a DynamicCache, reshaped here independently of the library."""
    cfg = model.peft_config["default"]
    flat = model.prompt_encoder["default"].output().detach()  # (nvt, layers * 2 * token_dim)
    heads = cfg.num_attention_heads
    kv = flat.view(NVT, cfg.num_layers * 2, heads, cfg.token_dim // heads).permute(1, 2, 0, 3)
    cache = DynamicCache()
    for layer in range(cfg.num_layers):
        key, value = kv[2 * layer], kv[2 * layer + 1]
        cache.update(key.unsqueeze(0).expand(batch, -1, -1, -1), value.unsqueeze(0).expand(batch, -1, -1, -1), layer)
    return cache


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_generation_equals_explicit_cache_reference(arch, bases, input_ids):
    base = bases[arch]
    model = wrap(base, "prefix_projection")
    generated = _greedy(model, input_ids)[:, input_ids.shape[1]:]
    cache = _explicit_prefix_cache(model, input_ids.shape[0])
    tokens, reference = input_ids, []
    mask = torch.ones(2, NVT + input_ids.shape[1], dtype=torch.long)
    with torch.no_grad():
        for _ in range(NEW):
            out = base(input_ids=tokens, attention_mask=mask, use_cache=True, **{cache_name(base): cache})
            tokens = out.logits[:, -1].argmax(-1, keepdim=True)
            reference.append(tokens)
            cache = out[cache_name(base)]
            mask = torch.cat((mask, torch.ones(2, 1, dtype=torch.long)), dim=1)
    assert torch.equal(generated, torch.cat(reference, dim=1))
    # the training forward sees the same prefix: its last logits give the first generated token
    assert torch.equal(_logits(model, input_ids=input_ids)[:, -1].argmax(-1), generated[:, 0])


# ---------------------------------------------------------------------- generation
GEN_CASES = [(a, m) for a in ("llama", "gpt2") for m in GEN_METHODS] + [("t5", "prompt"), ("t5", "prefix")]


@pytest.mark.parametrize("arch,method", GEN_CASES)
def test_greedy_with_and_without_cache_agree(arch, method, bases, input_ids):
    model = wrap(bases[arch], method)
    cached = _greedy(model, input_ids)
    uncached = _greedy(model, input_ids, use_cache=False)
    assert torch.equal(cached, uncached)
    with model.disable_adapter():
        plain = _greedy(model, input_ids)
    assert torch.equal(plain, _greedy(bases[arch], input_ids))


@pytest.mark.parametrize("arch,method", [(a, m) for a in ("llama", "gpt2") for m in GEN_METHODS])
def test_left_padded_batch_and_beam_search_match_single_rows(arch, method, bases, input_ids):
    model = wrap(bases[arch], method)
    short = input_ids[1:, 3:]  # row 2 is 3 tokens shorter: left-pad it
    batch = torch.cat((input_ids[:1], torch.cat((torch.zeros(1, 3, dtype=torch.long), short), dim=1)))
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    together = _greedy(model, batch, attention_mask=mask)[:, -NEW:]
    assert torch.equal(together[0], _greedy(model, input_ids[:1])[0, -NEW:])
    assert torch.equal(together[1], _greedy(model, short)[0, -NEW:])

    beams = _greedy(model, input_ids, num_beams=3)
    assert beams.shape == (2, input_ids.shape[1] + NEW)
    for row in range(2):
        assert torch.equal(beams[row], _greedy(model, input_ids[row : row + 1], num_beams=3)[0])


# ---------------------------------------------------------------------- peft interop
INTEROP = [(a, m) for a in ("llama", "gpt2") for m in METHODS] + [
    ("t5", "prompt"), ("t5", "ptuning_mlp"), ("t5", "prefix"), ("qwen2", "prefix"),
]


@pytest.mark.parametrize("arch,method", INTEROP)
def test_peft_interop_both_ways(arch, method, bases, input_ids, tmp_path, greedy_by_forward):
    base = bases[arch]
    task = "SEQ_2_SEQ_LM" if arch == "t5" else "CAUSAL_LM"
    kw = _inputs(arch, input_ids)

    ours = wrap(base, method)
    ours.save_pretrained(tmp_path / "ours")
    theirs = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), str(tmp_path / "ours")).eval()
    ours_out = _logits(ours, **kw)
    assert (ours_out[:, -4:] - _logits(base, **kw)[:, -4:]).abs().max() > 1e-3, "adapter had no effect"
    assert (ours_out - _logits(theirs, **kw)).abs().max() <= TOL

    torch.manual_seed(2)
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(base), peft_config(method, task_type=task)).eval()
    _quiet(theirs.save_pretrained, str(tmp_path / "theirs"))
    back = _quiet(AdapterModel.from_pretrained, copy.deepcopy(base), tmp_path / "theirs").eval()
    assert (_logits(back, **kw) - _logits(theirs, **kw)).abs().max() <= TOL
    if arch != "t5":
        # peft's side decoded by its forward alone: peft 0.21's generate() for virtual tokens does not follow
        # transformers 5.24's `cache` keyword (it decodes other tokens than its own forward implies).
        assert torch.equal(_greedy(back, input_ids), greedy_by_forward(theirs, input_ids, NEW))


# ---------------------------------------------------------------------- files
@pytest.mark.parametrize("method", ["prompt", "ptuning_lstm", "prefix_projection"])
def test_save_load_round_trip(method, llama_base, input_ids, tmp_path):
    model = wrap(llama_base, method)
    model.add_adapter("second", ours_config("prompt"))
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {"prompt_embeddings"}
    expected = _logits(model, input_ids=input_ids)
    loaded = AdapterModel.from_pretrained(copy.deepcopy(llama_base), tmp_path).eval()
    assert (expected - _logits(loaded, input_ids=input_ids)).abs().max() <= TOL
    assert not any(p.requires_grad for p in loaded.parameters())
    loaded.load_adapter(tmp_path / "second", "second")
    loaded.set_adapter("second")
    model.set_adapter("second")
    assert (_logits(model, input_ids=input_ids) - _logits(loaded, input_ids=input_ids)).abs().max() <= TOL

    # trainable reload: the encoder is collapsed to the saved prompt (PEFT stores no head) and trains
    again = AdapterModel.from_pretrained(copy.deepcopy(llama_base), tmp_path, is_trainable=True).eval()
    assert (expected - _logits(again, input_ids=input_ids)).abs().max() <= TOL
    trainable = [n for n, p in again.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_encoder.default.embedding.weight"]


def test_text_init_uses_tokenizer_embeddings(llama_base, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "classify": 5, "the": 17, "review": 42}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(tmp_path)
    kw = dict(num_virtual_tokens=5, prompt_tuning_init="TEXT", prompt_tuning_init_text="classify the review",
              tokenizer_name_or_path=str(tmp_path))
    model = _quiet(get_adapter_model, copy.deepcopy(llama_base), PromptTuningConfig(**kw))
    ids = torch.tensor([5, 17, 42, 5, 17])  # text ids repeated to num_virtual_tokens
    expected = llama_base.get_input_embeddings().weight[ids]
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, expected)
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(llama_base), peft.PromptTuningConfig(task_type="CAUSAL_LM", **kw))
    assert torch.equal(theirs.prompt_encoder["default"].embedding.weight, expected)


# ---------------------------------------------------------------------- mixing adapters
def test_lora_and_prompt_adapter_switching(llama_base, input_ids):
    torch.manual_seed(3)
    model = get_adapter_model(copy.deepcopy(llama_base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                     init_lora_weights=False)).eval()
    lora_out = _logits(model, input_ids=input_ids)
    base_out = _logits(llama_base, input_ids=input_ids)
    assert (lora_out - base_out).abs().max() > 1e-3
    model.add_adapter("prompt", ours_config("prompt"))
    model.add_adapter("prefix", ours_config("prefix"))
    assert torch.equal(_logits(model, input_ids=input_ids), lora_out)  # adding does not activate

    model.set_adapter("prompt")
    prompt_only = copy.deepcopy(llama_base)
    embeds = torch.cat((model.prompt_encoder["prompt"].embedding.weight.detach().expand(2, -1, -1),
                        prompt_only.get_input_embeddings()(input_ids)), dim=1)
    ref = _logits(prompt_only, inputs_embeds=embeds)  # LoRA switched off while the prompt is active
    assert (_logits(model, input_ids=input_ids) - ref).abs().max() <= TOL
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder.prompt.embedding.weight"}
    assert _greedy(model, input_ids).shape == (2, input_ids.shape[1] + NEW)

    model.set_adapter("default")
    assert torch.equal(_logits(model, input_ids=input_ids), lora_out)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)

    with pytest.raises(ValueError, match="virtual-token adapters .* together") as err:
        model.set_adapter(["prompt", "prefix"])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="together with"):
        model.set_adapter(["default", "prompt"])
    with pytest.raises(ValueError, match="merge"):
        model.set_adapter("prompt")
        model.merge_adapter()
    model.delete_adapter("prompt")
    assert "prompt" not in model.prompt_encoder and model.active_adapter == "default"


# ---------------------------------------------------------------------- training
TRAIN_CASES = [("llama", m) for m in ("prompt", "ptuning_mlp", "ptuning_lstm", "prefix", "prefix_projection")] + [
    ("gpt2", "prefix"), ("t5", "prompt"),
]


@pytest.mark.parametrize("arch,method", TRAIN_CASES)
def test_training_reduces_loss_and_leaves_base_untouched(arch, method, bases, input_ids):
    base = bases[arch]
    model = wrap(base, method).train()
    before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(n.startswith("prompt_encoder.default.") for n, p in model.named_parameters() if p.requires_grad)
    optim = torch.optim.Adam(params, lr=0.1)
    kw = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    losses = []
    for _ in range(20):
        loss = model(**kw).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, [round(x, 3) for x in losses]
    after = model.get_base_model().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
