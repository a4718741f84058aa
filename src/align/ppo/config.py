"""``PPOConfig``: the hyper-parameters of ``PPOTrainer``, each with its default, the reason for it, and a help string.

The defaults follow "Fine-Tuning Language Models from Human Preferences" (Ziegler et al. 2019), as TRL's PPO kept them.

No ``from __future__ import annotations`` here: the field types stay real types (``float``, ``int | None``), which
``HfArgumentParser`` and ``align.trl_compat``'s recipe checks read from ``dataclasses.fields``.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


def option(default: Any, doc: str) -> Any:
    """A dataclass field with a help string (``metadata["help"]``, as ``HfArgumentParser`` reads it)."""
    return dataclasses.field(default=default, metadata={"help": doc})


@dataclass
class PPOConfig:
    """Hyper-parameters of ``PPOTrainer``; ``dataclasses.fields(PPOConfig)[i].metadata["help"]`` describes each."""

    learning_rate: float = option(
        1e-5, "AdamW learning rate of the policy. 1e-5 suits full weights; a LoRA adapter wants 1e-4..1e-3"
    )
    max_steps: int = option(20, "PPO steps (rollout + update) to run. 20: a smoke run; real runs set it")
    batch_size: int = option(8, "prompts per rollout step, per process; a multiple of mini_batch_size")
    mini_batch_size: int = option(4, "rollouts per optimizer step: batch_size / mini_batch_size steps per epoch")
    ppo_epochs: int = option(4, "passes over each rollout batch. 4, as in Ziegler et al.")
    max_new_tokens: int = option(32, "longest sampled completion, in tokens")
    temperature: float = option(
        1.0, "sampling temperature; PPO's log-probabilities are those of softmax(logits / temperature). 1.0: as is"
    )
    top_k: int = option(
        0, "sample among the k likeliest tokens only. 0: off, since PPO's log-probabilities span the whole vocabulary"
    )
    top_p: float = option(1.0, "nucleus sampling. 1.0: off, for the same reason as top_k")
    gamma: float = option(1.0, "GAE discount. 1.0: none, as in Ziegler et al. (the score comes once, at the end)")
    lam: float = option(0.95, "GAE lambda. 0.95, as in Ziegler et al.")
    cliprange: float = option(0.2, "clip epsilon of the policy ratio. 0.2, as in Schulman et al. 2017")
    cliprange_value: float = option(0.2, "clip of the value prediction around the rollout's value, in value units")
    vf_coef: float = option(0.1, "weight of the value loss: loss = policy_loss + vf_coef * value_loss")
    kl_coef: float = option(0.05, "beta of the per-token KL penalty (the initial beta when adaptive_kl)")
    adaptive_kl: bool = option(
        False, "steer beta towards target_kl (Ziegler et al. 2019). Off: a fixed beta is easier to reason about"
    )
    target_kl: float = option(
        6.0, "per-sequence KL (nats) the adaptive controller steers towards. 6, as in Ziegler et al."
    )
    kl_horizon: int = option(10000, "horizon of the adaptive controller, in rollouts. 10000, as in Ziegler et al.")
    whiten_rewards: bool = option(False, "rescale the per-token rewards (no mean shift) before GAE")
    max_grad_norm: float = option(1.0, "gradient-norm clip, applied to the policy and to the value model separately")
    seed: int = option(42, "seeds sampling (plus the process index), the prompt order and the minibatch shuffles")
    save_steps: int = option(10, "checkpoint every this many steps (and at the end, or when stopped)")
    save_total_limit: int = option(2, "checkpoints kept, newest first. 2: one to resume from while the next is written")
    logging_steps: int = option(1, "call log_fn every this many steps")
    report_to: str | list[str] = option(
        "none", "experiment trackers, as transformers names them (tensorboard, wandb, mlflow, trackio). none: off"
    )
    value_learning_rate: float | None = option(
        None, "AdamW learning rate of the value model (all of whose weights train). None: learning_rate"
    )
    weight_decay: float = option(0.0, "AdamW weight decay of both models")
    disable_dropout: bool = option(
        True, "set every dropout to 0: dropout makes the rollout's log-probabilities disagree with the training pass"
    )
    forward_batch_size: int | None = option(None, "rows per no-grad forward pass of the rollout. None: mini_batch_size")

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"PPOConfig.{field} {why}, got {getattr(self, field)!r}")

        counts = ("max_steps", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "save_steps")
        for f in (*counts, "save_total_limit", "logging_steps", "kl_horizon"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise bad(f, "must be a positive integer")
        if self.forward_batch_size is not None and self.forward_batch_size < 1:
            raise bad("forward_batch_size", "must be a positive integer or None")
        for f in ("learning_rate", "temperature", "cliprange", "cliprange_value", "target_kl", "max_grad_norm"):
            v = getattr(self, f)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise bad(f, "must be a positive number")
        if self.value_learning_rate is not None and not self.value_learning_rate > 0:
            raise bad("value_learning_rate", "must be positive or None")
        for f in ("vf_coef", "kl_coef", "weight_decay"):
            v = getattr(self, f)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise bad(f, "must be a non-negative number")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "must be a non-negative integer (0 turns it off)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        for f in ("gamma", "lam"):
            if not 0 <= getattr(self, f) <= 1:
                raise bad(f, "must be in [0, 1]")
        if self.batch_size % self.mini_batch_size != 0:
            raise ValueError(
                f"PPOConfig.batch_size ({self.batch_size}) must be a multiple of "
                f"PPOConfig.mini_batch_size ({self.mini_batch_size})"
            )
