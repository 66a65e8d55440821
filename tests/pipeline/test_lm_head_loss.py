"""The loss without full-vocabulary logits equals the model's own, and projects only labelled positions.

A tiny Llama (random weights, float64) with an adapter: ``causal_lm_loss`` against
``model(**batch).loss`` and ``label_logprobs`` against log-softmax of the full logits, with the
adapter's gradients, on padded and packed batches, LoRA and prompt tuning, several chunk sizes;
DPO's ``pair_terms`` the same with and without it. A hook on the LM head shows what it projects.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, T5Config, \
    T5ForConditionalGeneration

from raypeft.adapters import LoraConfig, PromptTuningConfig, get_adapter_model
from raypeft.pipeline import lm_head_loss
from raypeft.pipeline.data import IGNORE_INDEX, PairCollator, SFTCollator
from raypeft.pipeline.data.packing import PackedPairCollator, PackedSFTCollator
from raypeft.pipeline.lm_head_loss import causal_lm_loss, enabled, label_logprobs, supports
from raypeft.pipeline.rl_math import token_logprobs
from raypeft.pipeline.roles import Roles
from raypeft.pipeline.stages import dpo

VOCAB = 96


def _base() -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96))


def _model(method: str) -> torch.nn.Module:
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if method == "lora" else \
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    model = get_adapter_model(_base(), config)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return model.double()


def _rows() -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for length, prompt in [(5, 2), (17, 9), (3, 1), (30, 20), (9, 4)]:
        ids = torch.randint(4, VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("method, packed", [("lora", False), ("lora", True), ("prompt_tuning", False)])
@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_loss_and_gradients_equal_the_models_own(method, packed, chunk):
    model = _model(method)
    collate = PackedSFTCollator(max_tokens=40) if packed else SFTCollator(pad_token_id=0)
    batch = collate(_rows())
    own = model(**batch).loss  # transformers computes it in float32 whatever the model's dtype
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits[:, -batch["labels"].shape[1]:]  # prompt tuning prepends positions
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                  ignore_index=IGNORE_INDEX)  # the formula, in float64
    reference.backward()
    expected = _grads(model)
    loss = causal_lm_loss(model, batch, chunk=chunk)
    loss.backward()
    got = _grads(model)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss.float(), own, rtol=1e-6, atol=1e-6)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12)


def test_only_labelled_positions_are_projected_in_chunks():
    model = _model("lora")
    batch = SFTCollator(pad_token_id=0)(_rows())
    shapes: list[tuple[int, ...]] = []
    head = model.get_base_model().get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    causal_lm_loss(model, batch, chunk=16).backward()
    handle.remove()
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert shapes[0] == (len(_rows()), 1, VOCAB)  # the model's own head, logits_to_keep=1
    chunks = shapes[1:]
    assert all(s[0] <= 16 and s[1:] == (VOCAB,) for s in chunks)
    # forward over the labelled positions once, and again for the backward (checkpointed chunks)
    assert sum(s[0] for s in chunks) == 2 * labelled
    assert labelled < batch["input_ids"].numel() // 2  # prompt and padding positions were skipped


def test_label_logprobs_equal_full_logits():
    model = _model("lora")
    batch = SFTCollator(pad_token_id=0)(_rows())
    labels = batch["labels"]
    mask = labels[:, 1:] != IGNORE_INDEX
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = token_logprobs(logits[:, :-1], labels[:, 1:].clamp(min=0)) * mask
    expected.sum().backward()
    g0 = _grads(model)
    got = label_logprobs(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, labels,
                         chunk=5)
    got.sum().backward()
    g1 = _grads(model)
    assert got.shape == expected.shape and (got[~mask] == 0).all()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-9, atol=1e-12)


def test_nothing_labelled_is_a_zero_with_a_graph():
    model = _model("lora")
    batch = SFTCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX] * 3}])
    loss = causal_lm_loss(model, batch)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    with pytest.raises(ValueError, match="chunk must be positive"):
        causal_lm_loss(model, SFTCollator(pad_token_id=0)(_rows()), chunk=0)


@pytest.mark.parametrize("packed", [False, True])
def test_dpo_terms_with_and_without_chunked_logprobs(packed):
    roles = Roles(_base())
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    roles.add(dpo.POLICY, cfg, trainable=True)
    roles.add_base(dpo.REFERENCE)
    torch.manual_seed(2)
    for name, p in roles.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    roles = roles.double()
    rows = []
    for r in _rows()[:4]:  # rejected: the same prompt, the response reversed
        p = r["labels"].count(IGNORE_INDEX)
        reply = r["input_ids"][p:][::-1]
        rows.append({"chosen_input_ids": r["input_ids"], "chosen_labels": r["labels"],
                     "rejected_input_ids": r["input_ids"][:p] + reply, "rejected_labels": [IGNORE_INDEX] * p + reply})
    batch = (PackedPairCollator(max_tokens=48) if packed else PairCollator(pad_token_id=0))(rows)
    results = []
    for chunked in (False, True):
        terms = dpo.pair_terms(roles, batch, beta=0.1, loss_type="sigmoid", chunked=chunked)
        terms[0].mean().backward()
        results.append(([t.detach() for t in terms], _grads(roles)))
    (t0, g0), (t1, g1) = results
    for a, b in zip(t1, t0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert t0[1].abs().max() > 1e-4 and g0.keys() == g1.keys() and g0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-9, atol=1e-12)


def test_which_models_and_settings_use_it():
    llama = _model("lora")
    assert supports(llama) and supports(llama.get_base_model())
    gemma2 = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                            final_logit_softcapping=30.0))
    assert not supports(gemma2)  # its logits are soft-capped after the head
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                             num_heads=2))
    assert not supports(t5)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not enabled("auto", llama, cpu) and enabled("auto", llama, cuda)
    assert enabled(True, llama, cpu) and not enabled(False, llama, cuda)
    assert not enabled(True, t5, cpu)  # falls back to the model's own loss
    assert lm_head_loss.DEFAULT_CHUNK >= 256


def _terms_and_grads(model, batch, **kw):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logp, entropy = lm_head_loss.label_terms(model, inputs, batch["labels"], **kw)
    (logp.sum() + 0.0 * entropy.sum()).backward()
    return logp.detach(), entropy, _grads(model)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_fused_head_equals_checkpointed_chunks(monkeypatch, dtype):
    """The frozen head's fused path (gradients computed in the forward) against the checkpointed
    one: log-probabilities at a temperature, entropies and the adapter's gradients."""
    model = _model("lora").to(dtype)
    head = model.get_base_model().get_output_embeddings()
    assert lm_head_loss._fusable(head)
    batch = PackedSFTCollator(max_tokens=40)(_rows())
    fused = _terms_and_grads(model, batch, chunk=7, temperature=0.7)
    monkeypatch.setattr(lm_head_loss, "_fusable", lambda _head: False)
    plain = _terms_and_grads(model, batch, chunk=7, temperature=0.7)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-2, "atol": 2e-3}
    for got, expected in zip(fused[:2], plain[:2]):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, **tol)
    assert fused[2].keys() == plain[2].keys() and plain[2]
    for name, expected in plain[2].items():
        assert fused[2][name].dtype == dtype
        torch.testing.assert_close(fused[2][name], expected, **tol)


def test_fused_head_projects_each_labelled_position_twice_and_checkpointed_three_times(monkeypatch):
    """FLOPs of the matmuls through the vocabulary in loss + backward: the fused path saves exactly
    one head matmul per labelled position. (Counted with a dispatch mode: ``FlopCounterMode`` adds
    global module hooks, which send the loss down the checkpointed path.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten

    class VocabMatmuls(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (aten.mm.default, aten.addmm.default):
                a, b = args[-2:]
                if VOCAB in (a.shape[1], b.shape[1]):
                    self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
            return func(*args, **(kwargs or {}))

    model = _model("lora")
    batch = SFTCollator(pad_token_id=0)(_rows())
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    hidden = model.get_base_model().config.hidden_size

    def flops() -> int:
        with VocabMatmuls() as counter:
            causal_lm_loss(model, batch, chunk=16).backward()
        model.zero_grad(set_to_none=True)
        return counter.flops

    fused = flops()
    monkeypatch.setattr(lm_head_loss, "_fusable", lambda _head: False)
    checkpointed = flops()
    # (the model's own logits_to_keep=1 projection of a [B, 1, H] slice is a batched matmul, not counted)
    assert fused == 2 * (2 * labelled * hidden * VOCAB)
    assert checkpointed == 3 * (2 * labelled * hidden * VOCAB)


def test_a_trainable_or_hooked_head_takes_the_checkpointed_path():
    model = _model("lora")
    head = model.get_base_model().get_output_embeddings()
    handle = head.register_forward_hook(lambda *_: None)
    assert not lm_head_loss._fusable(head)
    handle.remove()
    head.weight.requires_grad_(True)
    assert not lm_head_loss._fusable(head)
    batch = SFTCollator(pad_token_id=0)(_rows())
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                      ignore_index=IGNORE_INDEX).backward()  # in float64
    expected = _grads(model)
    causal_lm_loss(model, batch, chunk=5).backward()
    got = _grads(model)
    assert any("lm_head" in name for name in got) and expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12)
