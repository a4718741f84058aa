"""PPO tensor math against numbers worked out by hand (in the comments), not by the code under test."""

from __future__ import annotations

import math

import pytest
import torch

from align.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    response_mask,
    value_loss,
)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------- masked statistics


def test_masked_mean_and_var_ignore_padding_even_when_it_is_nan():
    x = t([[1.0, 2.0, 3.0], [4.0, float("nan"), float("inf")]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    # valid: 1, 2, 3, 4 -> mean 2.5
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    # per row: (1+2+3)/3 = 2, 4/1 = 4
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([2.0, 4.0])
    # squared deviations 2.25, 0.25, 0.25, 2.25 -> sum 5; biased 5/4, unbiased 5/3
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(1.25)
    assert masked_var(x, mask).item() == pytest.approx(5 / 3)
    # a row with no valid entry gives 0, not NaN
    assert masked_mean(x, t([[0, 0, 0], [1, 0, 0]]), dim=1).tolist() == pytest.approx([0.0, 4.0])


def test_masked_whiten_normalises_over_valid_tokens_only():
    x = t([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    # mean 2.5, unbiased var 5/3, std sqrt(5/3) = 1.2909944
    # (1 - 2.5) / 1.2909944 = -1.1618950, (2 - 2.5) / 1.2909944 = -0.3872983
    w = masked_whiten(x, mask)
    assert w[0].tolist() == pytest.approx([-1.1618950, -0.3872983, 0.3872983], abs=1e-6)
    assert w[1].tolist() == pytest.approx([1.1618950, 0.0, 0.0], abs=1e-6)  # padding is 0
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-7)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-6)
    # shift_mean=False rescales but keeps the mean: -1.1618950 + 2.5 = 1.3381050
    w2 = masked_whiten(x, mask, shift_mean=False)
    assert w2[0, 0].item() == pytest.approx(1.3381050, abs=1e-6)
    assert masked_mean(w2, mask).item() == pytest.approx(2.5)
    assert w2[1, 1:].tolist() == [0.0, 0.0]


def test_response_mask_ends_at_the_first_eos_inclusive():
    eos = 9
    ids = torch.tensor([[5, eos, 7, eos], [5, 6, 7, 8], [eos, 1, 1, 1]])
    assert response_mask(ids, eos).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    # several EOS ids: any of them ends the response
    ids = torch.tensor([[5, 3, 9, 1], [9, 3, 3, 3]])
    assert response_mask(ids, [3, 9]).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


# ---------------------------------------------------------------- KL-penalised rewards


def test_kl_penalty_on_every_valid_token_and_score_on_the_last_one():
    junk = 100.0  # padding holds garbage that must not leak
    logprobs = t([[-1.0, -2.0, -0.5, junk], [-0.2, junk, junk, junk], [0.0, 0.0, 0.0, -1.0]])
    ref = t([[-1.5, -1.0, -0.5, -junk], [-0.7, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    scores = t([2.0, 1.0, -3.0])
    rewards, kl = kl_penalized_rewards(logprobs, ref, scores, mask, kl_coef=0.1)
    # kl = lp - ref on valid tokens:  row0 [0.5, -1, 0 | 0], row1 [0.5 | 0 0 0], row2 [0, 0, 0, -1]
    expected_kl = t([[0.5, -1.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -1.0]])
    torch.testing.assert_close(kl, expected_kl)
    # rewards = -0.1 * kl, plus the score at the last valid token (index 2, 0 and 3 respectively):
    # row0: [-0.05, 0.1, 0 + 2, 0]; row1: [-0.05 + 1, 0, 0, 0]; row2: [0, 0, 0, 0.1 - 3]
    expected = t([[-0.05, 0.1, 2.0, 0.0], [0.95, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -2.9]])
    torch.testing.assert_close(rewards, expected)


# ---------------------------------------------------------------- GAE


def test_gae_three_step_episode_and_padding_row():
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]])
    values = t([[0.5, 0.6, 0.7], [0.5, 1.0, 50.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0, gamma 1, lam 0.95, V after the last token = 0:
    #   t=2: delta = 1 + 0 - 0.7 = 0.3                 A2 = 0.3
    #   t=1: delta = 0 + 0.7 - 0.6 = 0.1               A1 = 0.1 + 0.95 * 0.3 = 0.385
    #   t=0: delta = 0 + 0.6 - 0.5 = 0.1               A0 = 0.1 + 0.95 * 0.385 = 0.46575
    #   returns = A + V = [0.96575, 0.985, 1.0]
    assert adv[0].tolist() == pytest.approx([0.46575, 0.385, 0.3])
    assert ret[0].tolist() == pytest.approx([0.96575, 0.985, 1.0])
    # row 1 ends at t=1; the padded reward 99 and value 50 must not leak:
    #   t=1: delta = 2 + 0 - 1.0 = 1.0                 A1 = 1.0
    #   t=0: delta = 0 + 1.0 - 0.5 = 0.5               A0 = 0.5 + 0.95 * 1.0 = 1.45
    #   returns = [1.95, 2.0], padding 0
    assert adv[1].tolist() == pytest.approx([1.45, 1.0, 0.0])
    assert ret[1].tolist() == pytest.approx([1.95, 2.0, 0.0])


def test_gae_with_discount():
    rewards = t([[0.0, 0.0, 1.0]])
    values = t([[0.5, 0.6, 0.7]])
    mask = t([[1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    # gamma * lam = 0.855
    #   t=2: delta = 1 - 0.7 = 0.3                     A2 = 0.3
    #   t=1: delta = 0.9 * 0.7 - 0.6 = 0.03            A1 = 0.03 + 0.855 * 0.3 = 0.2865
    #   t=0: delta = 0.9 * 0.6 - 0.5 = 0.04            A0 = 0.04 + 0.855 * 0.2865 = 0.2849575
    assert adv[0].tolist() == pytest.approx([0.2849575, 0.2865, 0.3])
    assert ret[0].tolist() == pytest.approx([0.7849575, 0.8865, 1.0])


# ---------------------------------------------------------------- policy loss


def test_policy_loss_inside_the_clip_range_is_the_plain_surrogate():
    ratios, adv = [1.1, 0.9], [1.0, -2.0]
    lp = t([[math.log(r) for r in ratios]])
    loss, stats = policy_loss(lp, torch.zeros_like(lp), t([adv]), t([[1, 1]]), cliprange=0.2)
    # -A * ratio: -1.1 and +1.8 -> mean 0.35; nothing clipped
    assert loss.item() == pytest.approx(0.35)
    assert stats["clipfrac"].item() == 0.0
    assert stats["ratio_mean"].item() == pytest.approx(1.0)


def test_policy_loss_clipping_for_both_signs_of_the_advantage():
    # token: ratio, A   -> unclipped -A*r, clipped -A*clip(r, 0.8, 1.2), loss term = the max
    #  1:   1.1, +1    -> -1.1, -1.1 -> -1.1   (inside the range)
    #  2:   1.5, +2    -> -3.0, -2.4 -> -2.4   clipped (gain capped at ratio 1.2)
    #  3:   0.5, -1    ->  0.5,  0.8 ->  0.8   clipped (ratio 0.5 treated as 0.8)
    #  4:   0.5, +1    -> -0.5, -0.8 -> -0.5   not clipped (the pessimistic unclipped term wins)
    #  5:   1.5, -1    ->  1.5,  1.2 ->  1.5   not clipped
    #  6:  10.0, +5    -> padding, ignored
    # loss = (-1.1 - 2.4 + 0.8 - 0.5 + 1.5) / 5 = -0.34; clipfrac = 2/5
    ratios = [1.1, 1.5, 0.5, 0.5, 1.5, 10.0]
    lp = t([[math.log(r) for r in ratios]])
    adv = t([[1.0, 2.0, -1.0, 1.0, -1.0, 5.0]])
    mask = t([[1, 1, 1, 1, 1, 0]])
    loss, stats = policy_loss(lp, torch.zeros_like(lp), adv, mask, cliprange=0.2)
    assert loss.item() == pytest.approx(-0.34)
    assert stats["clipfrac"].item() == pytest.approx(0.4)
    # ratio_mean = (1.1 + 1.5 + 0.5 + 0.5 + 1.5) / 5 = 1.02
    assert stats["ratio_mean"].item() == pytest.approx(1.02)
    # approx_kl = 0.5 * mean(log r^2) = 0.5 * (0.0953102^2 + 2 * 0.4054651^2 + 2 * 0.6931472^2) / 5
    #           = 0.5 * (0.0090840 + 0.3288039 + 0.9609060) / 5 = 0.1298794
    assert stats["approx_kl"].item() == pytest.approx(0.1298794, abs=1e-6)


def test_policy_loss_gradient_vanishes_on_clipped_tokens():
    lp = t([[math.log(1.5), math.log(1.1)]]).requires_grad_(True)
    loss, _ = policy_loss(lp, torch.zeros_like(lp), t([[1.0, 1.0]]), t([[1, 1]]), cliprange=0.2)
    loss.backward()
    # clipped token: no gradient; unclipped: d(-r/2)/dlp = -r/2 = -0.55
    assert lp.grad[0].tolist() == pytest.approx([0.0, -0.55])


# ---------------------------------------------------------------- value loss


def test_clipped_value_loss():
    # token: v, old, R  -> v_clip = old + clip(v - old, +-0.2); (v-R)^2 vs (v_clip-R)^2
    #  1: 1.0, 0.9,  1.5 -> v_clip 1.0:  0.25 vs 0.25 -> 0.25  (not clipped)
    #  2: 2.0, 1.0,  1.5 -> v_clip 1.2:  0.25 vs 0.09 -> 0.25  (not clipped)
    #  3: 2.0, 1.0,  3.0 -> v_clip 1.2:  1.00 vs 3.24 -> 3.24  clipped
    #  4: 0.0, 1.0, -1.0 -> v_clip 0.8:  1.00 vs 3.24 -> 3.24  clipped
    #  5: padding
    # loss = 0.5 * (0.25 + 0.25 + 3.24 + 3.24) / 4 = 0.8725; vf_clipfrac = 0.5
    values = t([[1.0, 2.0, 2.0, 0.0, 7.0]])
    old = t([[0.9, 1.0, 1.0, 1.0, -7.0]])
    ret = t([[1.5, 1.5, 3.0, -1.0, 0.0]])
    loss, stats = value_loss(values, old, ret, t([[1, 1, 1, 1, 0]]), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.8725)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)


# ---------------------------------------------------------------- entropy


def test_entropy_from_logits():
    # p = (0.5, 0.25, 0.25): H = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2 = 1.0397208
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]])) + 7.0  # shift-invariant
    assert entropy_from_logits(logits).tolist() == pytest.approx([1.5 * math.log(2), math.log(3)], abs=1e-6)


# ---------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_update_formula():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # kl 9: error 9/6 - 1 = 0.5, clipped to 0.2 -> beta *= 1 + 0.2 * 8 / 10000 = 1.00016 -> 0.100016
    ctl.update(9.0, n_steps=8)
    assert ctl.value == pytest.approx(0.100016, rel=1e-12)
    # kl 5.4: error 5.4/6 - 1 = -0.1 -> beta *= 1 - 0.1 * 100 / 10000 = 0.999 -> 0.099915984
    ctl.update(5.4, n_steps=100)
    assert ctl.value == pytest.approx(0.099915984, rel=1e-12)
    # kl 0: error -1, clipped to -0.2 -> beta *= 1 - 0.2 * 1000 / 10000 = 0.98 -> 0.09791766432
    ctl.update(0.0, n_steps=1000)
    assert ctl.value == pytest.approx(0.09791766432, rel=1e-12)

    restored = AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    restored.load_state_dict(ctl.state_dict())
    assert (restored.value, restored.target, restored.horizon) == (ctl.value, 6.0, 10000.0)


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, n_steps=1000)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05
