"""The tensor math of PPO for language models: no model code, nothing but torch.

Conventions, shared by every function here:

* Per-token tensors are ``[B, T]`` over the *response* tokens of ``B`` rollouts (the prompt is not part of them).
* ``mask`` is ``[B, T]``, 1 on valid response tokens and 0 on padding. Responses are right-padded: the valid tokens of
  a row are a prefix of it, ending at the first EOS (included) or at ``T``.
* Token ``t`` of a response is an action; ``logprobs[b, t] = log pi(a_t | prompt, a_<t)``; ``values[b, t] = V(s_t)``
  is the value of the state *before* that action.

References: Schulman et al. 2017 (PPO, clipped surrogate), Schulman et al. 2016 (GAE), Ziegler et al. 2019
("Fine-Tuning Language Models from Human Preferences": per-token KL penalty, adaptive KL coefficient),
Ouyang et al. 2022 (InstructGPT).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "entropy_from_logits",
    "gae",
    "kl_penalized_rewards",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "response_mask",
    "value_loss",
]


# ---------------------------------------------------------------- masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the valid entries: ``sum(x * mask) / sum(mask)`` (over ``dim``, or over everything when None).

    Entries where ``mask == 0`` never reach the result, even when they hold inf/NaN. A slice with no valid entry
    gives 0 instead of NaN.
    """
    mask = mask.to(x.dtype)
    x = x.masked_fill(mask == 0, 0.0)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1e-8)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over all valid entries: ``mean_m((x - mean_m(x))^2)``, times ``n / (n - 1)`` when ``unbiased``.

    ``n = sum(mask)``. With fewer than two valid entries the Bessel correction is undefined and the biased value
    (0 for one entry) is returned.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n >= 2:
            var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise over the valid tokens of the whole batch: ``(x - mu) / sqrt(var + eps)``, ``+ mu`` again when not
    ``shift_mean`` (only the scale changes). ``mu`` and the unbiased ``var`` come from the valid entries only; padding
    positions of the result are 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened.masked_fill(mask == 0, 0.0)


# ---------------------------------------------------------------- rollouts


def response_mask(response_ids: torch.Tensor, eos_token_id: int | list[int] | tuple[int, ...]) -> torch.Tensor:
    """``[B, T]`` 0/1 mask of the response tokens up to and including the first EOS of each row.

    ``mask[b, t] = 1`` iff no EOS occurs in ``response_ids[b, :t]``. Rows without an EOS are valid to the end.
    ``eos_token_id`` may be one id or several (any of them ends the response).
    """
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= response_ids == e
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS count strictly before position t
    return (eos_before == 0).long()


def kl_penalized_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards with the KL penalty of Ziegler et al. 2019 / InstructGPT.

    ``kl_t = logprobs_t - ref_logprobs_t`` (the sampled-token estimate of KL(pi || pi_ref)), and

        ``r_t = -kl_coef * kl_t  (+ score  if t is the last valid token of the row)``

    Returns ``(rewards, kl)``, both ``[B, T]`` and 0 on padding. ``scores`` is ``[B]`` (one score per sequence).
    """
    kl = (logprobs - ref_logprobs).masked_fill(mask == 0, 0.0)
    rewards = -kl_coef * kl
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, -1).max(dim=1).values  # [B]; -1 for a row with no valid token
    rows = torch.nonzero(last >= 0, as_tuple=True)[0]
    rewards = rewards.clone()
    rewards[rows, last[rows]] += scores.to(rewards.dtype)[rows]
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), computed backwards over the response tokens:

        ``delta_t = r_t + gamma * V_{t+1} - V_t``
        ``A_t     = delta_t + gamma * lam * A_{t+1}``
        ``R_t     = A_t + V_t``          (the value targets)

    The episode ends at the last valid token: ``V`` and ``A`` after it are 0, so padding never leaks into a row.
    Padding positions get ``A = R = 0``. Returns ``(advantages, returns)``.
    """
    maskf = mask.to(values.dtype)
    values = values.masked_fill(mask == 0, 0.0)
    rewards = rewards.masked_fill(mask == 0, 0.0)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * maskf[:, t]
        advantages[:, t] = adv
        next_value, next_adv = values[:, t], adv
    returns = (advantages + values) * maskf
    return advantages, returns


# ---------------------------------------------------------------- losses


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017), as a loss to minimise:

        ``ratio = exp(logprobs - old_logprobs)``
        ``loss  = mean_m( max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) )``

    Stats (detached 0-dim tensors): ``clipfrac`` = share of valid tokens where the clipped term is the larger one
    (strictly), ``approx_kl = 0.5 * mean_m((logprobs - old_logprobs)^2)``, ``ratio_mean = mean_m(ratio)``.
    """
    log_ratio = (logprobs - old_logprobs).masked_fill(mask == 0, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask).detach(),
        "approx_kl": (0.5 * masked_mean(log_ratio**2, mask)).detach(),
        "ratio_mean": masked_mean(ratio, mask).detach(),
    }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (as in OpenAI baselines' PPO2 and the "PPO for LMs" recipe):

        ``v_clip = old_values + clip(values - old_values, -c, c)``
        ``loss   = 0.5 * mean_m( max((values - R)^2, (v_clip - R)^2) )``

    Stats: ``vf_clipfrac`` = share of valid tokens where the clipped error is (strictly) the larger one.
    """
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    stats = {"vf_clipfrac": masked_mean((err_clipped > err).to(values.dtype), mask).detach()}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution at each position: ``H = logsumexp(z) - sum_i softmax(z)_i * z_i``.

    ``logits`` is ``[..., V]``; the result is ``[...]`` (one value per token).
    """
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


# ---------------------------------------------------------------- KL coefficient


class FixedKLController:
    """A constant KL coefficient ``beta``; ``update`` does nothing."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (kept so both controllers are used the same way)."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """The adaptive KL coefficient of Ziegler et al. 2019, steering the measured KL towards ``target``:

        ``e    = clip(current_kl / target - 1, -0.2, 0.2)``
        ``beta = beta * (1 + e * n_steps / horizon)``

    ``current_kl`` is the mean per-sequence KL of the last batch and ``n_steps`` the number of sequences in it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))
