"""Actor-critic PPO for causal language models: a LoRA policy, its adapter-disabled base as the reference, and a
separate value model.

``trainer`` (the update loop, ``PPOTrainer``), ``rollout`` (sampling and scoring), ``core`` (the tensor math, pure
functions), ``config`` (``PPOConfig``), ``value`` (``ValueModel``), ``checkpoint`` (save and resume).
"""

from __future__ import annotations

from align.ppo.config import PPOConfig
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
from align.ppo.rollout import Rollout
from align.ppo.trainer import NonFinitePPOLoss, PPOTrainer
from align.ppo.value import ValueModel

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
