"""Critic-free advantages and the clip-higher surrogate against hand values and plain-Python references."""

from __future__ import annotations

import math

import pytest
import torch

from raypeft.pipeline.rl_math import (GROUP_ESTIMATORS, KLPenalty, aggregate_token_loss, clipped_surrogate_loss,
                                      discounted_returns, dr_grpo_advantages, filter_groups, flat_groups, group_std,
                                      grpo_advantages, kl_k1, kl_k3, reinforce_pp_advantages, rloo_advantages)

# ------------------------------------------------------------------------------ plain references


def _groups(rewards: list[float], g: int) -> list[list[float]]:
    return [rewards[i:i + g] for i in range(0, len(rewards), g)]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: list[float]) -> float:  # Bessel-corrected, as torch.std
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _grpo_ref(rewards, g, eps):
    return [(r - _mean(grp)) / (_std(grp) + eps) for grp in _groups(rewards, g) for r in grp]


def _dr_grpo_ref(rewards, g):
    return [r - _mean(grp) for grp in _groups(rewards, g) for r in grp]


def _rloo_ref(rewards, g):
    out = []
    for grp in _groups(rewards, g):
        for i, r in enumerate(grp):
            others = grp[:i] + grp[i + 1:]
            out.append(r - _mean(others))
    return out


def _reinforce_pp_ref(scores, lengths, kl, kl_coef, gamma, eps):
    """Per-token rewards -> returns -> whitened over all tokens (population std), row by row."""
    returns = []
    for i, n in enumerate(lengths):
        rewards = [-kl_coef * kl[i][t] for t in range(n)]
        rewards[n - 1] += scores[i]
        row, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            running = rewards[t] + gamma * running
            row[t] = running
        returns.append(row)
    flat = [x for row in returns for x in row]
    m = _mean(flat)
    sd = math.sqrt(sum((x - m) ** 2 for x in flat) / len(flat))
    return [[(x - m) / (sd + eps) for x in row] for row in returns], returns


def _surrogate_ref(new, old, adv, lengths, lo, hi, normalisation, max_length=None):
    """Per-token clipped loss with Python floats, then the three normalisations written out."""
    per_row, n_low, n_high = [], 0, 0
    for i, n in enumerate(lengths):
        row = []
        for t in range(n):
            r = math.exp(new[i][t] - old[i][t])
            a = adv[i][t]
            un, cl = -a * r, -a * min(max(r, 1 - lo), 1 + hi)
            row.append(max(un, cl))
            n_low += cl > un and r < 1
            n_high += cl > un and r > 1
        per_row.append(row)
    tokens = sum(lengths)
    if normalisation == "sequence":
        loss = _mean([sum(row) / len(row) for row in per_row])
    elif normalisation == "token":
        loss = sum(sum(row) for row in per_row) / tokens
    else:
        loss = sum(sum(row) for row in per_row) / (len(lengths) * max_length)
    return loss, n_low / tokens, n_high / tokens


def _mask(lengths: list[int], width: int) -> torch.Tensor:
    return torch.tensor([[1] * n + [0] * (width - n) for n in lengths])


# ------------------------------------------------------------------------------ group advantages


def test_group_estimators_match_plain_references() -> None:
    torch.manual_seed(0)
    rewards = torch.randn(12, dtype=torch.float64)
    r = rewards.tolist()
    assert grpo_advantages(rewards, 4, eps=1e-6).tolist() == pytest.approx(_grpo_ref(r, 4, 1e-6))
    assert dr_grpo_advantages(rewards, 3).tolist() == pytest.approx(_dr_grpo_ref(r, 3))
    assert rloo_advantages(rewards, 6).tolist() == pytest.approx(_rloo_ref(r, 6))
    assert set(GROUP_ESTIMATORS) == {"grpo", "dr_grpo", "rloo"}


def test_group_estimators_by_hand() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])  # one group: mean 3, std sqrt(14/3)
    std = math.sqrt(14 / 3)
    assert grpo_advantages(rewards, 4, eps=0.0).tolist() == pytest.approx([-2 / std, -1 / std, 0.0, 3 / std])
    assert dr_grpo_advantages(rewards, 4).tolist() == pytest.approx([-2.0, -1.0, 0.0, 3.0])
    # RLOO: each baseline is the mean of the three others, e.g. 1 - (2+3+6)/3
    assert rloo_advantages(rewards, 4).tolist() == pytest.approx([1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0])


def test_rloo_baseline_excludes_the_sample_itself() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    bumped = rewards.clone()
    bumped[0] += 5.0
    before, after = rloo_advantages(rewards, 4), rloo_advantages(bumped, 4)
    # Own advantage moves by the full +5 (its baseline does not contain it) ...
    assert (after[0] - before[0]).item() == pytest.approx(5.0)
    # ... while every other sample's baseline rises by 5 / (G - 1).
    assert (after[1:] - before[1:]).tolist() == pytest.approx([-5 / 3] * 3)


@pytest.mark.parametrize("value", [0.1, 1.0, -3.7, 1e6])
def test_a_group_with_equal_rewards_gets_zero_advantage(value: float) -> None:
    rewards = torch.tensor([value] * 3 + [0.0, 1.0, 2.0])  # a flat group, then a varied one
    for name, estimator in GROUP_ESTIMATORS.items():
        adv = estimator(rewards, 3)
        assert adv[:3].tolist() == [0.0, 0.0, 0.0], name  # exactly, not eps-divided rounding
        assert adv[3:].abs().sum() > 0, name
    # REINFORCE++ has no group but the batch: an all-equal batch (no KL) gives zero advantage;
    # with the group baseline, a flat group stays at zero when the rows have equal lengths.
    mask = torch.ones(6, 2)
    adv, _ = reinforce_pp_advantages(torch.full((6,), value), mask)
    assert adv.abs().max().item() == 0.0
    adv, _ = reinforce_pp_advantages(rewards, mask, num_generations=3)
    assert adv[:3].abs().max().item() == 0.0 and adv[3:].abs().sum() > 0


def test_layout_contract_is_checked() -> None:
    with pytest.raises(ValueError, match="whole groups of 4"):
        grpo_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="whole groups of 2"):
        dr_grpo_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="num_generations >= 2"):
        rloo_advantages(torch.zeros(3), 1)
    # One completion per prompt: GRPO and Dr. GRPO have nothing to compare with, so zero.
    assert grpo_advantages(torch.tensor([1.0, 2.0]), 1).tolist() == [0.0, 0.0]
    assert group_std(torch.tensor([1.0, 2.0]), 1).tolist() == [0.0, 0.0]


def test_groups_are_read_in_order() -> None:
    # Group by group: rows 0-1 are prompt 0, rows 2-3 prompt 1 (not interleaved).
    rewards = torch.tensor([0.0, 2.0, 10.0, 10.0])
    assert flat_groups(rewards, 2).tolist() == [False, True]
    assert group_std(rewards, 2).tolist() == pytest.approx([math.sqrt(2.0), 0.0])
    assert dr_grpo_advantages(rewards, 2).tolist() == [-1.0, 1.0, 0.0, 0.0]


# ------------------------------------------------------------------------------ REINFORCE++


def test_discounted_returns_by_hand() -> None:
    rewards = torch.tensor([[1.0, 0.0, 2.0], [3.0, 4.0, 99.0]])
    out = discounted_returns(rewards, _mask([3, 2], 3), gamma=0.5)
    assert out.tolist() == [[1.0 + 0.25 * 2.0, 1.0, 2.0], [3.0 + 0.5 * 4.0, 4.0, 0.0]]


def test_reinforce_pp_matches_plain_reference() -> None:
    torch.manual_seed(2)
    lengths = [4, 2, 3, 1]
    scores = torch.randn(4, dtype=torch.float64)
    kl = torch.randn(4, 4, dtype=torch.float64) * 0.1
    mask = _mask(lengths, 4)
    adv, ret = reinforce_pp_advantages(scores, mask, kl=kl * mask, kl_coef=0.3, gamma=0.9)
    ref_adv, ref_ret = _reinforce_pp_ref(scores.tolist(), lengths, kl.tolist(), 0.3, 0.9, 1e-8)
    for i, n in enumerate(lengths):
        assert adv[i, :n].tolist() == pytest.approx(ref_adv[i])
        assert ret[i, :n].tolist() == pytest.approx(ref_ret[i])
        assert adv[i, n:].abs().sum().item() == 0.0
    # Whitened over the batch's tokens: mean 0, population std 1.
    tokens = adv[mask.bool()]
    assert tokens.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert tokens.std(correction=0).item() == pytest.approx(1.0, rel=1e-6)


def test_reinforce_pp_group_baseline_centres_scores_first() -> None:
    scores = torch.tensor([1.0, 3.0, 10.0, 14.0])
    mask = torch.ones(4, 1)
    _, ret = reinforce_pp_advantages(scores, mask, num_generations=2)
    assert ret[:, 0].tolist() == [-1.0, 1.0, -2.0, 2.0]


# ------------------------------------------------------------------------------ zero-variance filter


def test_filter_groups_keeps_whole_groups() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0, float("nan"), 3.0])
    valid = torch.tensor([True] * 6 + [False, True])
    out = filter_groups(rewards, 2, valid=valid)
    assert out.keep_groups.tolist() == [False, True, False, False]
    assert out.keep_rows.tolist() == [False, False, True, True, False, False, False, False]
    assert out.zero_variance_fraction == pytest.approx(0.5)
    assert out.skipped_fraction == pytest.approx(0.25)
    kept = filter_groups(rewards, 2, drop_zero_variance=False, valid=valid)
    assert kept.keep_groups.tolist() == [True, True, True, False]
    assert kept.zero_variance_fraction == pytest.approx(0.5)  # still measured for logging
    # The kept rows are whole groups, so the estimators can run on them directly.
    assert grpo_advantages(rewards[out.keep_rows], 2).tolist() == pytest.approx([-0.5 / (math.sqrt(0.5) + 1e-6),
                                                                                 0.5 / (math.sqrt(0.5) + 1e-6)])


# ------------------------------------------------------------------------------ KL estimators


def test_kl_estimators() -> None:
    torch.manual_seed(3)
    logp = torch.randn(200, dtype=torch.float64) - 2.0
    ref = torch.randn(200, dtype=torch.float64) - 2.0
    d = (ref - logp).tolist()
    assert kl_k1(logp, ref).tolist() == pytest.approx([-x for x in d])
    k3 = kl_k3(logp, ref)
    assert k3.tolist() == pytest.approx([math.exp(x) - x - 1 for x in d])
    assert (k3 >= 0).all()
    assert kl_k3(logp, logp).abs().max().item() == 0.0


def test_kl_penalty_zero_coefficient_needs_no_reference() -> None:
    assert not KLPenalty(0.0).needs_reference
    assert KLPenalty(0.04, "k1").needs_reference
    with pytest.raises(ValueError, match="kl.coef"):
        KLPenalty(-0.1)
    with pytest.raises(ValueError, match="kl.estimator"):
        KLPenalty(0.1, "k2")
    new, mask = torch.zeros(1, 2), torch.ones(1, 2)
    out = clipped_surrogate_loss(new, new, torch.ones(1), mask, kl_penalty=KLPenalty(0.0))
    assert out.kl is None and out.loss.item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="reference log-probs"):
        clipped_surrogate_loss(new, new, torch.ones(1), mask, kl_penalty=KLPenalty(0.1))


def test_kl_term_enters_the_loss_per_token() -> None:
    new = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    old = new.detach()
    ref = torch.tensor([[-1.5, -2.0, -0.5]])
    mask = _mask([2], 3)
    out = clipped_surrogate_loss(new, old, torch.zeros(1), mask, normalisation="token",
                                 kl_penalty=KLPenalty(0.5, "k3"), ref_logprobs=ref)
    k3 = [math.exp(-0.5) + 0.5 - 1, 0.0]  # d = ref - logp = -0.5, 0
    assert out.loss.item() == pytest.approx(0.5 * sum(k3) / 2)
    assert out.kl.item() == pytest.approx(sum(k3) / 2)
    out.loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp); the masked third token gets no gradient
    assert new.grad[0].tolist() == pytest.approx([0.5 * (1 - math.exp(-0.5)) / 2, 0.0, 0.0])
    # Zero coefficient with a reference given: KL is measured, the loss is untouched.
    measured = clipped_surrogate_loss(new, old, torch.zeros(1), mask, ref_logprobs=ref)
    assert measured.loss.item() == 0.0 and measured.kl.item() == pytest.approx(sum(k3) / 2)


# ------------------------------------------------------------------------------ surrogate loss


@pytest.mark.parametrize("normalisation", ["sequence", "token", "constant"])
def test_clipped_surrogate_matches_plain_reference(normalisation: str) -> None:
    torch.manual_seed(1)
    lengths = [5, 3, 1, 4]
    new = torch.randn(4, 5, dtype=torch.float64) * 0.3 - 1.0
    old = new + torch.randn(4, 5, dtype=torch.float64) * 0.3
    adv = torch.randn(4, 5, dtype=torch.float64)
    out = clipped_surrogate_loss(new, old, adv, _mask(lengths, 5), clip_low=0.2, clip_high=0.28,
                                 normalisation=normalisation, max_length=6)
    loss, low, high = _surrogate_ref(new.tolist(), old.tolist(), adv.tolist(), lengths, 0.2, 0.28,
                                     normalisation, max_length=6)
    assert out.loss.item() == pytest.approx(loss, rel=1e-9)
    assert out.clip_fraction_low.item() == pytest.approx(low)
    assert out.clip_fraction_high.item() == pytest.approx(high)
    assert low > 0 and high > 0  # the case exercises both bounds


def test_clip_higher_clips_asymmetrically() -> None:
    mask = torch.ones(1, 1)
    up = torch.tensor([[math.log(1.25)]], requires_grad=True)  # ratio 1.25, A > 0
    out = clipped_surrogate_loss(up, torch.zeros(1, 1), torch.ones(1), mask, clip_low=0.2, clip_high=0.28)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-1.25) and out.clip_fraction_high.item() == 0.0
    assert up.grad.item() == pytest.approx(-1.25)  # still pushed up: 1.25 < 1 + 0.28
    sym = clipped_surrogate_loss(up, torch.zeros(1, 1), torch.ones(1), mask, clip_low=0.2)
    assert sym.loss.item() == pytest.approx(-1.2) and sym.clip_fraction_high.item() == 1.0
    down = torch.tensor([[math.log(0.75)]], requires_grad=True)  # ratio 0.75, A < 0: below 1 - 0.2
    out = clipped_surrogate_loss(down, torch.zeros(1, 1), -torch.ones(1), mask, clip_low=0.2, clip_high=0.28)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(0.8) and out.clip_fraction_low.item() == 1.0
    assert out.clip_fraction_high.item() == 0.0 and down.grad.item() == 0.0
    # The same ratios on the sides where clipping does not bind are never clipped.
    inner = clipped_surrogate_loss(torch.tensor([[math.log(1.25)], [math.log(0.75)]]), torch.zeros(2, 1),
                                   torch.tensor([-1.0, 1.0]), torch.ones(2, 1), clip_low=0.2, clip_high=0.28)
    assert inner.clip_fraction_low.item() == 0.0 and inner.clip_fraction_high.item() == 0.0


def test_token_and_sequence_normalisation_differ_on_unequal_lengths() -> None:
    # Per-token losses -A with ratio 1: row 0 has one token of loss 4, row 1 three tokens of loss 1.
    new = torch.zeros(2, 3)
    adv = torch.tensor([[-4.0, 0.0, 0.0], [-1.0, -1.0, -1.0]])
    mask = _mask([1, 3], 3)
    seq = clipped_surrogate_loss(new, new, adv, mask, normalisation="sequence").loss.item()
    tok = clipped_surrogate_loss(new, new, adv, mask, normalisation="token").loss.item()
    const = clipped_surrogate_loss(new, new, adv, mask, normalisation="constant", max_length=4).loss.item()
    assert seq == pytest.approx((4 / 1 + 3 / 3) / 2)  # 2.5: each row weighs the same
    assert tok == pytest.approx((4 + 3) / 4)  # 1.75: each token weighs the same
    assert const == pytest.approx((4 + 3) / (2 * 4))  # 0.875: Dr. GRPO's constant B * max_length
    # With equal lengths sequence and token agree.
    full = torch.ones(2, 3)
    assert aggregate_token_loss(adv, full, "sequence").item() == pytest.approx(
        aggregate_token_loss(adv, full, "token").item())


def test_per_completion_advantages_broadcast_over_tokens() -> None:
    torch.manual_seed(4)
    new, old = torch.randn(3, 4), torch.randn(3, 4)
    adv, mask = torch.randn(3), _mask([4, 2, 3], 4)
    a = clipped_surrogate_loss(new, old, adv, mask, normalisation="token")
    b = clipped_surrogate_loss(new, old, adv.unsqueeze(1).expand(3, 4), mask, normalisation="token")
    assert a.loss.item() == pytest.approx(b.loss.item())


def test_aggregation_errors() -> None:
    x, m = torch.ones(1, 2), torch.ones(1, 2)
    with pytest.raises(ValueError, match="needs max_length"):
        aggregate_token_loss(x, m, "constant")
    with pytest.raises(ValueError, match="expected one of sequence, token, constant"):
        aggregate_token_loss(x, m, "nope")
