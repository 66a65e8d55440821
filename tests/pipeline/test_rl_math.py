"""The RL formulas against hand-computed values and plain-Python reference implementations."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from raypeft.pipeline.rl_math import (AdaptiveKLController, FixedKLController, RunningMoments, bradley_terry_loss, clipped_policy_loss,
                              clipped_value_loss, dpo_loss, entropy_from_logits, explained_variance, gae,
                              kl_penalised_rewards,
                              last_token_index, masked_mean, masked_var, masked_whiten, token_logprobs)
from raypeft.pipeline.config import parse_config
from raypeft.pipeline.stages import ppo


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_bradley_terry_loss_by_hand() -> None:
    chosen = torch.tensor([2.0, 0.0, -1.0])
    rejected = torch.tensor([1.0, 0.5, -1.0])
    expected = -(math.log(_sigmoid(1.0)) + math.log(_sigmoid(-0.5)) + math.log(0.5)) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)


def test_bradley_terry_gradient_pushes_chosen_up() -> None:
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)


def test_masked_statistics_ignore_masked_entries() -> None:
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([1.5, 3.5])
    assert masked_var(x, mask).item() == pytest.approx(5.0 / 3.0)  # (2.25+0.25+0.25+2.25)/3
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(1.25)
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(w, mask).item() == pytest.approx(1.0, rel=1e-5)
    assert w[0, 2].item() == 0.0 and w[1, 2].item() == 0.0
    kept = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(2.5, rel=1e-5)


def test_last_token_index_left_and_right_padding() -> None:
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 0, 3]
    assert last_token_index(left).tolist() == [3, 3]


def test_token_logprobs_and_entropy() -> None:
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])  # probs [.5,.5] then [.75,.25]
    lp = token_logprobs(logits, torch.tensor([[1, 0]]))
    assert lp.tolist()[0] == pytest.approx([math.log(0.5), math.log(0.75)])
    ent = entropy_from_logits(logits)[0]
    assert ent.tolist() == pytest.approx([math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))])


def test_gae_against_hand_computation() -> None:
    # One row of 3 tokens, one of 2 (third masked). gamma 0.9, lambda 0.8.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 99.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.1, 0.2, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    g, l = 0.9, 0.8
    # row 0
    d2 = 1.0 - 0.3
    d1 = 0.0 + g * 0.3 - 0.4
    d0 = 0.0 + g * 0.4 - 0.5
    a2 = d2
    a1 = d1 + g * l * a2
    a0 = d0 + g * l * a1
    # row 1: the episode ends after token 1, so V after it is 0
    e1 = 2.0 - 0.2
    e0 = 0.5 + g * 0.2 - 0.1
    b1 = e1
    b0 = e0 + g * l * b1
    adv, ret = gae(rewards, values, mask, g, l)
    assert adv[0].tolist() == pytest.approx([a0, a1, a2])
    assert adv[1].tolist() == pytest.approx([b0, b1, 0.0])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.3])
    assert ret[1].tolist() == pytest.approx([b0 + 0.1, b1 + 0.2, 0.0])


def test_gae_with_lambda_one_is_discounted_return_minus_value() -> None:
    torch.manual_seed(0)
    rewards, values = torch.randn(4, 6), torch.randn(4, 6)
    mask = torch.ones(4, 6)
    adv, ret = gae(rewards, values, mask, gamma=0.95, lam=1.0)
    for t in range(6):
        discounted = sum(0.95 ** (k - t) * rewards[:, k] for k in range(t, 6))
        assert torch.allclose(ret[:, t], discounted, atol=1e-5)
        assert torch.allclose(adv[:, t], discounted - values[:, t], atol=1e-5)


def test_kl_penalised_rewards_put_the_score_on_the_last_token() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = kl_penalised_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [0.5, 0.5, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0], [-0.05, -0.05 - 1.0, 0.0]]))


def test_explained_variance_by_hand() -> None:
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert float(explained_variance(returns.clone(), returns, mask)) == pytest.approx(1.0)  # a perfect critic
    assert float(explained_variance(torch.zeros_like(returns), returns, mask)) == pytest.approx(0.0)  # a constant
    values = torch.tensor([[2.0, 1.0, 3.0], [4.0, 7.0, -50.0]])  # errors -1, 1, 0, 0, -2; the masked -50 ignored
    errors, real = [-1.0, 1.0, 0.0, 0.0, -2.0], [1.0, 2.0, 3.0, 4.0, 5.0]

    def var(xs):
        mean = sum(xs) / len(xs)
        return sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)

    assert float(explained_variance(values, returns, mask)) == pytest.approx(1.0 - var(errors) / var(real))


def test_a_critic_that_swings_along_the_response_scrambles_the_advantages() -> None:
    """What a reward model's head does read at prefix tokens (it was trained on the last token
    only): values that swing by more than the scores spread. GAE then follows the critic's errors,
    not the score, and the explained variance of the returns is far below 0; with a zero head most
    tokens' (whitened) advantages stay on the side of their row's score."""
    torch.manual_seed(0)
    rows, steps = 64, 12
    scores = torch.randn(rows) * 1.3 + 3.4  # the demo reward model's spread on SFT samples
    mask = torch.ones(rows, steps)
    rewards, _ = kl_penalised_rewards(scores, torch.zeros(rows, steps), torch.zeros(rows, steps), mask, kl_coef=1.0)
    centred = (scores - scores.mean()).unsqueeze(1).expand(rows, steps)

    def sign_agreement(values):
        adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
        white = masked_whiten(adv, mask)
        return float(((white > 0) == (centred > 0)).float().mean()), float(explained_variance(values, ret, mask))

    zero_agree, zero_ev = sign_agreement(torch.zeros(rows, steps))
    swing_agree, swing_ev = sign_agreement(torch.randn(rows, steps) * 4.0 - 3.4)
    assert zero_agree > 0.8 and zero_ev == pytest.approx(0.0)  # 0.84: lambda < 1 shrinks early tokens' share
    assert swing_agree < 0.65 and swing_ev < -1.0  # 0.55, a coin flip; -8.1


def _policy_loss_reference(new, old, adv, mask, eps):
    """PPO-clip written per token with Python floats."""
    total, n, clipped_count, sq = 0.0, 0, 0, 0.0
    for i in range(len(new)):
        for t in range(len(new[i])):
            if not mask[i][t]:
                continue
            r = math.exp(new[i][t] - old[i][t])
            a = adv[i][t]
            un = -a * r
            cl = -a * min(max(r, 1 - eps), 1 + eps)
            total += max(un, cl)
            clipped_count += cl > un
            sq += (new[i][t] - old[i][t]) ** 2
            n += 1
    return total / n, clipped_count / n, 0.5 * sq / n


def test_clipped_policy_loss_matches_plain_reference() -> None:
    torch.manual_seed(1)
    new = torch.randn(3, 5) * 0.3 - 1.0
    old = new + torch.randn(3, 5) * 0.3
    adv = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    out = clipped_policy_loss(new, old, adv, mask, cliprange=0.2)
    loss, frac, akl = _policy_loss_reference(new.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2)
    assert out.loss.item() == pytest.approx(loss, rel=1e-5)
    assert out.clip_fraction.item() == pytest.approx(frac)
    assert out.approx_kl.item() == pytest.approx(akl, rel=1e-5)
    assert 0.0 < frac < 1.0  # the case exercises both branches


def test_clipped_policy_loss_gradient_is_zero_once_clipped() -> None:
    # Positive advantage and ratio already above 1+eps: no incentive to push further.
    new = torch.tensor([[0.5]], requires_grad=True)
    out = clipped_policy_loss(new, torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1), 0.2)
    out.loss.backward()
    assert new.grad.item() == 0.0
    new2 = torch.tensor([[0.0]], requires_grad=True)
    clipped_policy_loss(new2, torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1), 0.2).loss.backward()
    assert new2.grad.item() == pytest.approx(-1.0)


def test_clipped_value_loss_by_hand() -> None:
    values = torch.tensor([[1.0, 0.0, 5.0]])
    old = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, frac = clipped_value_loss(values, old, returns, mask, cliprange_value=0.5)
    # token 0: plain (1-2)^2 = 1, clipped V=0.5 -> (0.5-2)^2 = 2.25 -> 2.25; token 1: both 1.0
    assert loss.item() == pytest.approx(0.5 * (2.25 + 1.0) / 2)
    assert frac.item() == pytest.approx(0.5)


def test_dpo_losses_by_hand() -> None:
    pc, pr = torch.tensor([-1.0]), torch.tensor([-3.0])
    rc, rr = torch.tensor([-1.5]), torch.tensor([-2.0])
    h = (-1.0 + 1.5) - (-3.0 + 2.0)  # 1.5
    beta = 0.5
    sig, cr, rj = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="sigmoid")
    assert sig.item() == pytest.approx(-math.log(_sigmoid(beta * h)))
    assert cr.item() == pytest.approx(0.25) and rj.item() == pytest.approx(-0.5)
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    assert ipo.item() == pytest.approx((h - 1.0) ** 2)
    hinge, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge")
    assert hinge.item() == pytest.approx(max(0.0, 1 - beta * h))
    with pytest.raises(ValueError, match="dpo.loss_type"):
        dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="nope")


def test_dpo_loss_at_the_reference_is_log2() -> None:
    x = torch.tensor([-2.0, -4.0])
    losses, c, r = dpo_loss(x, x - 1, x, x - 1, beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2)
    assert c.tolist() == [0.0, 0.0] and r.tolist() == [0.0, 0.0]


def test_kl_controllers() -> None:
    fixed = FixedKLController(0.2)
    assert fixed.update(100.0, 64) == 0.2
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    assert ctl.update(9.0, 100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))  # error clipped to +0.2
    v = ctl.value
    assert ctl.update(5.4, 100) == pytest.approx(v * (1 - 0.1 * 100 / 1000))  # error -0.1
    v = ctl.value
    assert ctl.update(6.0, 100) == pytest.approx(v)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_running_moments_equal_the_moments_of_everything_seen() -> None:
    torch.manual_seed(0)
    batches = [torch.randn(n, dtype=torch.float64) * 3 + 7 for n in (5, 1, 32, 17)]
    moments = RunningMoments()
    for b in batches:
        moments.update(b.sum().item(), (b * b).sum().item(), float(b.numel()))
    seen = torch.cat(batches).double()
    assert moments.count == seen.numel()
    assert moments.mean == pytest.approx(seen.mean().item(), rel=1e-9)
    assert moments.var == pytest.approx(seen.var(unbiased=False).item(), rel=1e-9)
    z = moments.normalise(seen)
    assert z.mean().item() == pytest.approx(0.0, abs=1e-9) and z.std(unbiased=False).item() == pytest.approx(1.0)
    assert RunningMoments.from_state(moments.state()) == moments  # a resumed run continues the same moments
    constant = RunningMoments()
    constant.update(20.0, 200.0, 2.0)  # two scores of 10: no spread, so only centred
    assert constant.normalise(torch.tensor([10.0, 12.0])).tolist() == [0.0, 2.0]


def test_an_uncentred_score_with_a_zero_critic_ramps_the_advantages_over_positions() -> None:
    """Every response scores the same 10: nothing tells one sample from another, yet with V = 0
    GAE puts lam^(T-1-t) * 10 on token t and whitening turns that into a push down on the first
    tokens and up on the last ones. Centred by its running moments, the score gives no advantage."""
    spec = parse_config({"ppo": {"lam": 0.9}}).ppo
    mask = torch.ones(4, 6, dtype=torch.long)
    zeros = torch.zeros(4, 6)
    ro = SimpleNamespace(scores=torch.full((4,), 10.0), ended=torch.ones(4, dtype=torch.bool), logprobs=zeros,
                         ref_logprobs=zeros, values=zeros, mask=mask)
    ppo.add_advantages(ro, spec, kl_coef=0.1)
    assert (ro.advantages[:, 0] < 0).all() and (ro.advantages[:, -1] > 0).all()
    assert torch.all(ro.advantages[:, 1:] > ro.advantages[:, :-1])  # a ramp, the same in every row
    moments = RunningMoments()
    ppo.update_score_moments(moments, ppo.penalised_scores(ro, spec))
    ppo.add_advantages(ro, spec, kl_coef=0.1, moments=moments)
    assert torch.count_nonzero(ro.advantages) == 0
