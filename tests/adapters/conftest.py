"""Tiny models built from configs (no hub access) shared by the adapters tests."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")


def tiny_llama_config(**overrides):
    kwargs = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def tiny_gpt2_config(**overrides):
    kwargs = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    kwargs.update(overrides)
    return transformers.GPT2Config(**kwargs)


def _build(factory, seed: int = 0):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = factory()
    return model.eval()


@pytest.fixture(scope="session")
def llama_base():
    return _build(lambda: transformers.LlamaForCausalLM(tiny_llama_config()))


@pytest.fixture(scope="session")
def gpt2_base():
    return _build(lambda: transformers.GPT2LMHeadModel(tiny_gpt2_config()))


@pytest.fixture(scope="session")
def llama_cls_base():
    return _build(lambda: transformers.LlamaForSequenceClassification(tiny_llama_config(num_labels=3)))


@pytest.fixture(scope="session")
def t5_base():
    cfg = transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    return _build(lambda: transformers.T5ForConditionalGeneration(cfg))


@pytest.fixture
def llama(llama_base):
    return copy.deepcopy(llama_base)


@pytest.fixture
def gpt2(gpt2_base):
    return copy.deepcopy(gpt2_base)


@pytest.fixture
def input_ids():
    gen = torch.Generator().manual_seed(123)
    return torch.randint(1, 100, (2, 7), generator=gen)


def _logits(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


@pytest.fixture
def fwd():
    """``fwd(model, input_ids, **kw)`` -> logits without grad."""
    return _logits


def _greedy_by_forward(model, input_ids, steps, pad_token_id=0, min_new_tokens=0, **kw):
    """Greedy decoding by re-running the whole sequence each step: no KV cache and none of
    generate()'s plumbing, so it is a reference for any model whose forward is right. Like
    generate(), eos cannot be chosen before ``min_new_tokens``, and a row that has produced it
    continues with ``pad_token_id``."""
    eos = getattr(model.config, "eos_token_id", None)
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    seq = input_ids
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(steps):
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), **kw).logits[:, -1]
            if step < min_new_tokens and eos:
                logits = logits.clone()
                logits[:, sorted(eos)] = float("-inf")
            nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            done |= torch.tensor([int(t) in eos for t in nxt])
            seq = torch.cat((seq, nxt[:, None]), dim=1)
    return seq


@pytest.fixture(scope="session")
def greedy_by_forward():
    return _greedy_by_forward
