"""Actor-critic PPO for causal language models: a LoRA policy, its adapter-disabled base as the reference, and a
separate value model (see ``align.ppo.trainer``); the tensor math lives in ``align.ppo.core``."""

from __future__ import annotations

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
from align.ppo.trainer import NonFinitePPOLoss, PPOConfig, PPOTrainer, Rollout, ValueModel

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "NonFinitePPOLoss",
    "PPOConfig",
    "PPOTrainer",
    "Rollout",
    "ValueModel",
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
