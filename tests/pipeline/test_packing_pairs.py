"""Packing for the preference-pair stages: per-side figures of a packed batch equal the padded batch's.

The reward stage reads one score per side (the value head at its last token), DPO one summed
log-probability per side; the packed batch reduces its bins back to those figures through
``segments`` and ``ends``. A tiny Llama (random weights, float64) with LoRA roles scores the same
pairs padded (``PairCollator``) and packed (``PackedPairCollator``), through the stages' own
functions: scores, log-probabilities, losses and the trainable roles' gradients must agree.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raypeft.adapters import LoraConfig
from raypeft.pipeline.data import IGNORE_INDEX, PairCollator, count_tokens
from raypeft.pipeline.data.packing import PackedPairCollator, at_ends, pack_pairs, sequence_sums
from raypeft.pipeline.rl_math import bradley_terry_loss
from raypeft.pipeline.roles import Roles
from raypeft.pipeline.stages import dpo, reward


def _pairs(seed: int = 0) -> list[dict[str, list[int]]]:
    """Pairs of very different lengths (one prompt shared by both sides, as the tokenizers make them)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for prompt, chosen, rejected in [(3, 2, 9), (12, 20, 4), (1, 1, 1), (6, 30, 11), (2, 5, 5)]:
        p = torch.randint(4, 96, (prompt,), generator=g).tolist()
        c = torch.randint(4, 96, (chosen,), generator=g).tolist()
        r = torch.randint(4, 96, (rejected,), generator=g).tolist()
        rows.append({"chosen_input_ids": p + c, "chosen_labels": [IGNORE_INDEX] * prompt + c,
                     "rejected_input_ids": p + r, "rejected_labels": [IGNORE_INDEX] * prompt + r})
    return rows


def _base(attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        attn_implementation=attn))


def _randomise(roles: Roles) -> Roles:
    """Non-zero LoRA B and value heads, so scores and every gradient are non-trivial."""
    torch.manual_seed(1)
    for name, p in roles.named_parameters():
        if "lora_B" in name or name.startswith("heads."):
            torch.nn.init.normal_(p, std=0.05)
    return roles.double()


def _grads(roles: Roles) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in roles.named_parameters() if p.grad is not None}
    roles.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("max_tokens", [None, 24, 40, 64])
def test_pack_pairs_layout(max_tokens):
    rows = _pairs()
    packed = pack_pairs(rows, max_tokens=max_tokens, pad_token_id=0)
    sides = [(r["chosen_input_ids"], r["chosen_labels"]) for r in rows] + \
            [(r["rejected_input_ids"], r["rejected_labels"]) for r in rows]
    assert packed["ends"].shape == (len(sides), 2) and "attention_mask" not in packed
    seg = packed["segments"]
    for i, (ids, labels) in enumerate(sides):  # PairCollator's order: the chosen sides, then the rejected
        b, last = packed["ends"][i].tolist()
        where = (seg[b] == i).nonzero().flatten()
        assert int((seg == i).sum()) == len(ids)  # in one bin, contiguous, ending at `ends`
        assert where.tolist() == list(range(last - len(ids) + 1, last + 1))
        assert packed["input_ids"][b, where].tolist() == ids
        assert packed["position_ids"][b, where].tolist() == list(range(len(ids)))
        assert packed["labels"][b, where].tolist() == [IGNORE_INDEX] + labels[1:]
        assert max_tokens is None or len(where) > max_tokens or seg[b].ge(0).sum() <= max_tokens
    assert count_tokens(packed) == sum(len(ids) for ids, _ in sides)
    assert (packed["labels"][seg < 0] == IGNORE_INDEX).all()


def test_sequence_reductions_and_errors():
    values = torch.arange(12, dtype=torch.float64).reshape(2, 6).requires_grad_()
    segments = torch.tensor([[0, 0, 1, 1, 1, -1], [2, 2, 2, 2, -1, -1]])
    sums = sequence_sums(values, segments, 3)
    assert sums.tolist() == [0 + 1, 2 + 3 + 4, 6 + 7 + 8 + 9]
    sums.sum().backward()
    assert values.grad.tolist() == (segments >= 0).double().tolist()  # padding gets no gradient
    assert at_ends(values, torch.tensor([[0, 1], [0, 4], [1, 3]])).tolist() == [1.0, 4.0, 9.0]
    with pytest.raises(ValueError, match="empty batch"):
        pack_pairs([])
    with pytest.raises(ValueError, match="no tokens"):
        pack_pairs([{"chosen_input_ids": [], "chosen_labels": [], "rejected_input_ids": [5], "rejected_labels": [5]}])
    with pytest.raises(ValueError, match="labels as long"):
        pack_pairs([{"chosen_input_ids": [4, 5], "chosen_labels": [5], "rejected_input_ids": [5],
                     "rejected_labels": [5]}])
    with pytest.raises(ValueError, match="positive"):
        PackedPairCollator(max_tokens=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("max_tokens", [None, 40])
def test_reward_scores_and_gradients_packed_equal_padded(attn, max_tokens):
    roles = Roles(_base(attn))
    roles.add(reward.ROLE, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), trainable=True,
              value_head="zero")
    roles = _randomise(roles)
    rows = _pairs()
    results = []
    for collate in (PairCollator(pad_token_id=0), PackedPairCollator(max_tokens=max_tokens, pad_token_id=0)):
        chosen, rejected = reward.pair_scores(roles, collate(rows))
        bradley_terry_loss(chosen, rejected).backward()
        results.append((chosen.detach(), rejected.detach(), _grads(roles)))
    (c0, r0, g0), (c1, r1, g1) = results
    torch.testing.assert_close(c1, c0, rtol=0, atol=1e-12)
    torch.testing.assert_close(r1, r0, rtol=0, atol=1e-12)
    assert (c0 - r0).abs().min() > 1e-6  # scores that differ per side: a wrong side would show
    assert g0.keys() == g1.keys() and any("heads." in n for n in g0) and any("lora_A" in n for n in g0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_terms_and_gradients_packed_equal_padded(loss_type):
    roles = Roles(_base("sdpa"))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    roles.add(dpo.POLICY, cfg, trainable=True)
    roles.add(dpo.REFERENCE, cfg, trainable=False)  # a frozen adapter of its own, as policy_init gives
    roles = _randomise(roles)
    rows = _pairs(seed=3)
    results = []
    for collate in (PairCollator(pad_token_id=0), PackedPairCollator(max_tokens=48, pad_token_id=0)):
        batch = collate(rows)
        logp, count = dpo.response_logprobs(roles, dpo.POLICY, batch)
        terms = dpo.pair_terms(roles, batch, beta=0.1, loss_type=loss_type)
        terms[0].mean().backward()
        results.append((logp.detach(), count.double(), [t.detach() for t in terms], _grads(roles)))
    (lp0, n0, t0, g0), (lp1, n1, t1, g1) = results
    torch.testing.assert_close(n1, n0)
    assert n0.tolist() == [len(r["chosen_input_ids"]) - r["chosen_labels"].count(IGNORE_INDEX) for r in rows] + \
        [len(r["rejected_input_ids"]) - r["rejected_labels"].count(IGNORE_INDEX) for r in rows]
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-10)
    for a, b in zip(t1, t0):  # losses, implicit rewards, per-token means
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert t0[1].abs().max() > 1e-4  # policy != reference: the implicit rewards are not all 0
    assert g0.keys() == g1.keys() and g0 and all(f".{dpo.POLICY}." in n for n in g0)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-9, atol=1e-12)


def test_widths_rounded_to_a_multiple_change_no_figure():
    """``data.pad_to_multiple_of``: wider rows of padding (its own block when packed, masked when
    padded), the same per-side scores and SFT loss."""
    from raypeft.pipeline.data import SFTCollator
    from raypeft.pipeline.data.packing import PackedSFTCollator

    roles = Roles(_base("sdpa"))
    roles.add(reward.ROLE, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), trainable=True,
              value_head="zero")
    roles = _randomise(roles)
    rows = _pairs()
    with torch.no_grad():
        for make in (lambda m: PairCollator(pad_token_id=0, pad_to_multiple_of=m),
                     lambda m: PackedPairCollator(max_tokens=40, pad_token_id=0, pad_to_multiple_of=m)):
            plain, rounded = make(None)(rows), make(16)(rows)
            width, before = rounded["input_ids"].shape[1], plain["input_ids"].shape[1]
            assert width % 16 == 0 and width > before
            for a, b in zip(reward.pair_scores(roles, rounded), reward.pair_scores(roles, plain)):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        sft_rows = [{"input_ids": r["chosen_input_ids"], "labels": r["chosen_labels"]} for r in rows]
        model = roles.model
        for make in (lambda m: SFTCollator(pad_token_id=0, pad_to_multiple_of=m),
                     lambda m: PackedSFTCollator(max_tokens=40, pad_token_id=0, pad_to_multiple_of=m)):
            plain, rounded = make(None)(sft_rows), make(16)(sft_rows)
            assert rounded["input_ids"].shape[1] % 16 == 0
            # transformers' loss is float32 whatever the model's dtype
            torch.testing.assert_close(model(**rounded).loss, model(**plain).loss, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be positive"):
        PackedPairCollator(pad_to_multiple_of=0)
