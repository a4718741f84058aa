"""Actor-critic PPO for causal language models (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022).

The policy is a LoRA adapter (a peft ``PeftModel``) on a causal LM; the reference policy is the *same* model with the
adapter disabled, so no second copy of the weights is held. The critic is a separate ``ValueModel`` (a transformer
backbone with a one-output linear head), started from the reward model when there is one.

One step (``PPOTrainer.step``):

1. rollout (``align.ppo.rollout``): ``batch_size`` prompts -> sampled completions; log-probabilities of the sampled
   tokens under the policy and under the reference; values; scores from ``reward_fn``;
2. per-token rewards ``r_t = -beta * (logp_t - logp_ref_t)``, plus the score on the last response token;
3. GAE advantages and returns; advantages whitened over the batch;
4. ``ppo_epochs`` passes over shuffled minibatches of ``mini_batch_size`` rollouts, one optimizer step each, on
   ``policy_loss + vf_coef * value_loss``;
5. the KL coefficient ``beta`` is updated (adaptive controller) from the measured KL.

The math of 2-4 is in ``align.ppo.core``, the hyper-parameters in ``align.ppo.config``, checkpoints in
``align.ppo.checkpoint``.

Distributed use: everything goes through an ``accelerate.Accelerator`` (single device or DDP). ``batch_size`` is per
process; prompts are dealt so that processes see different prompts; logged statistics are averaged over processes.
FSDP and DeepSpeed are not supported (generation and the checkpoints assume whole, replicated weights).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from align.errors import NonFiniteLoss
from align.ppo import checkpoint
from align.ppo.config import PPOConfig
from align.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from align.ppo.rollout import RewardFn, Rollout, Sampler, token_logprobs
from align.ppo.value import ValueModel


class NonFinitePPOLoss(NonFiniteLoss, FloatingPointError):
    """A PPO loss (or score) was NaN/inf. Both an ``align`` ``NonFiniteLoss`` and a builtin ``FloatingPointError``."""


class PPOTrainer:
    """PPO on a LoRA policy against its own adapter-disabled base (the reference), with a separate value model.

    Args:
        config: the hyper-parameters.
        policy: a peft ``PeftModel`` (a causal LM with a trainable LoRA adapter).
        value_model: the critic; all its weights train.
        tokenizer: gives ``eos_token_id`` and ``pad_token_id`` (unless passed); prompts are padded by hand, so its
            ``padding_side`` does not matter and is not changed.
        prompts: token ids per prompt, already chat-templated, without padding.
        reward_fn: ``(prompt_ids, completion_ids) -> [B]`` float scores; completions exclude padding and include the
            EOS when one was generated.
        accelerator: an ``accelerate.Accelerator`` (one is created when None).
        log_fn: called on the main process with each logged step's statistics.
        eos_token_id, pad_token_id, generation_kwargs: see ``align.ppo.rollout.Sampler``.
    """

    def __init__(
        self,
        config: PPOConfig,
        policy: nn.Module,
        value_model: ValueModel,
        tokenizer: Any,
        prompts: Sequence[Sequence[int]],
        reward_fn: RewardFn,
        *,
        accelerator: Any = None,
        log_fn: Callable[[dict[str, Any]], None] | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generation_kwargs: dict[str, Any] | None = None,
    ):
        from accelerate.utils import set_seed
        from peft import PeftModel

        if not isinstance(policy, PeftModel):
            raise ValueError(
                f"PPO needs a LoRA adapter on the policy (a peft PeftModel), got {type(policy).__name__}: the "
                "reference policy is the same model with its adapter disabled. Full-weight PPO would need a separate "
                "reference copy and is out of scope for now; wrap the model with "
                "peft.get_peft_model(model, LoraConfig(...))"
            )
        if not isinstance(value_model, ValueModel):
            raise ValueError(f"value_model must be an align.ppo.ValueModel, got {type(value_model).__name__}")
        if not prompts:
            raise ValueError("PPO needs at least one prompt")
        self.prompts = [[int(t) for t in p] for p in prompts]
        if any(len(p) == 0 for p in self.prompts):
            raise ValueError("every prompt needs at least one token (found an empty prompt)")
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator()
        self.accelerator, self.config, self.log_fn = accelerator, config, log_fn

        set_seed(config.seed + accelerator.process_index)  # sampling in generate() uses the global torch RNG
        self.shuffle_generator = torch.Generator().manual_seed(config.seed)  # minibatch order, the same everywhere
        if config.disable_dropout:
            _disable_dropout(policy)
            _disable_dropout(value_model)
        self._policy_params = [p for p in policy.parameters() if p.requires_grad]
        if not self._policy_params:
            raise ValueError("the policy has no trainable parameters (is the LoRA adapter active and trainable?)")
        self._value_params = [p.requires_grad_(True) for p in value_model.parameters()]
        # One AdamW with a param group per model (a single optimizer keeps fp16 loss scaling simple).
        optimizer = torch.optim.AdamW(
            [
                {"params": self._policy_params, "lr": config.learning_rate},
                {"params": self._value_params, "lr": config.value_learning_rate or config.learning_rate},
            ],
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        self.policy, self.value_model, self.optimizer = accelerator.prepare(policy, value_model, optimizer)
        self.sampler = Sampler(
            accelerator.unwrap_model(self.policy),
            accelerator.unwrap_model(self.value_model),
            reward_fn,
            config,
            tokenizer,
            device=accelerator.device,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            generation_kwargs=generation_kwargs,
        )
        if config.adaptive_kl:
            self.kl_ctl: FixedKLController | AdaptiveKLController = AdaptiveKLController(
                config.kl_coef, config.target_kl, config.kl_horizon
            )
        else:
            self.kl_ctl = FixedKLController(config.kl_coef)

        self.global_step = 0
        self.cursor = 0  # index of the next prompt in the endless sequence of seeded shuffles
        self.history: list[dict[str, Any]] = []
        self._order_epoch, self._order = -1, []
        checkpoint.attach(self)  # accelerator.save_state / load_state now cover all of the above

    # ------------------------------------------------------------ one step

    def step(self) -> dict[str, Any]:
        """One PPO step (rollout, advantages, ``ppo_epochs`` of minibatch updates, KL coefficient update).

        Returns the step's statistics (averaged over processes) and appends them to ``self.history``:

        * rollout: ``reward_mean`` / ``reward_std`` (raw ``reward_fn`` scores, population std), ``kl`` (mean over
          sequences of ``sum_t logp_t - logp_ref_t``; a sampled estimate, so it can dip below 0), ``kl_coef`` (the
          beta used this step), ``non_score_reward`` (mean per-sequence ``-beta * kl``), ``response_length``
          (valid tokens incl. EOS), ``value_mean``, ``return_mean``;
        * optimisation, averaged over all minibatches and epochs: ``policy_loss``, ``value_loss``, ``entropy``
          (per token, of ``softmax(z / T)``), ``clipfrac``, ``approx_kl``, ``ratio_mean``, ``vf_clipfrac``;
        * ``step`` and ``seconds`` (wall time of the step).
        """
        acc, cfg = self.accelerator, self.config
        t0 = time.perf_counter()
        # 1. rollout
        ro = self.sampler.rollout(self._next_prompts())
        self._check_finite(ro.scores, lambda: f"a reward_fn score ({ro.scores.tolist()})")
        mask, r = ro.mask, ro.mask.shape[1]

        # 2-3. per-token rewards, GAE advantages (whitened) and returns
        kl_coef = self.kl_ctl.value
        rewards, kl = kl_penalized_rewards(ro.logprobs, ro.ref_logprobs, ro.scores, mask, kl_coef)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)

        # 4. ppo_epochs passes over shuffled minibatches, one optimizer step each
        self.policy.train()
        self.value_model.train()
        totals: dict[str, list[torch.Tensor]] = {}
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(mask.shape[0], generator=self.shuffle_generator).to(mask.device)
            for idx in perm.split(cfg.mini_batch_size):
                ids, attn, pos, m = ro.input_ids[idx], ro.attention_mask[idx], ro.position_ids[idx], mask[idx]
                logits = self.sampler.response_logits(self.policy, ids, attn, pos, r)
                logprobs = token_logprobs(logits, ids[:, -r:])
                vpred = self.value_model(ids, attn, pos)[:, -(r + 1) : -1]
                pg_loss, pg_stats = policy_loss(logprobs, ro.logprobs[idx], advantages[idx], m, cfg.cliprange)
                vf_loss, vf_stats = value_loss(vpred, ro.values[idx], returns[idx], m, cfg.cliprange_value)
                loss = pg_loss + cfg.vf_coef * vf_loss
                parts = (pg_loss.detach(), vf_loss.detach())
                self._check_finite(
                    loss.detach(), lambda p=parts: f"the loss (policy {p[0].item():.4g}, value {p[1].item():.4g})"
                )
                acc.backward(loss)
                if acc.scaler is not None:  # fp16: unscale once, then clip each model on its own
                    acc.unscale_gradients()
                torch.nn.utils.clip_grad_norm_(self._policy_params, cfg.max_grad_norm)
                torch.nn.utils.clip_grad_norm_(self._value_params, cfg.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)

                with torch.no_grad():
                    entropy = masked_mean(entropy_from_logits(logits.detach()), m)
                for k, v in {
                    "policy_loss": parts[0],
                    "value_loss": parts[1],
                    "entropy": entropy,
                    **pg_stats,
                    **vf_stats,
                }.items():
                    totals.setdefault(k, []).append(v.float())

        # 5. statistics (averaged over processes) and the next beta
        self.global_step += 1
        stats, mean_kl = self._statistics(ro, kl, returns, kl_coef, totals)
        self.kl_ctl.update(mean_kl, n_steps=cfg.batch_size * acc.num_processes)
        stats["seconds"] = time.perf_counter() - t0
        self.history.append(stats)
        if self.log_fn is not None and acc.is_main_process and self.global_step % cfg.logging_steps == 0:
            self.log_fn(dict(stats))
        return stats

    def _statistics(
        self, ro: Rollout, kl: torch.Tensor, returns: torch.Tensor, kl_coef: float, totals: dict[str, list]
    ) -> tuple[dict[str, Any], float]:
        """The step's statistics, averaged over processes, and the mean per-sequence KL over all processes."""
        acc, mask = self.accelerator, ro.mask
        keys = sorted(totals)
        local = torch.stack([torch.stack(totals[k]).mean() for k in keys])
        train_stats = dict(zip(keys, acc.reduce(local, "mean").tolist(), strict=True))
        seq_kl = kl.sum(1)
        scores_all, kl_all = acc.gather(ro.scores), acc.gather(seq_kl)
        roll = torch.stack(
            [
                seq_kl.mean(),
                (-kl_coef * seq_kl).mean(),
                mask.float().sum(1).mean(),
                masked_mean(ro.values, mask),
                masked_mean(returns, mask),
            ]
        )
        kl_mean, non_score, length, value_mean, return_mean = acc.reduce(roll, "mean").tolist()
        stats = {
            "step": self.global_step,
            "reward_mean": scores_all.mean().item(),
            "reward_std": scores_all.std(correction=0).item(),
            "kl": kl_mean,
            "kl_coef": kl_coef,
            "non_score_reward": non_score,
            "response_length": length,
            "value_mean": value_mean,
            "return_mean": return_mean,
            **train_stats,
        }
        return stats, kl_all.mean().item()

    # ------------------------------------------------------------ train loop

    def train(
        self,
        *,
        checkpoint_dir: Path | None = None,
        resume_from: Path | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """Run steps until ``config.max_steps``; return a summary.

        ``checkpoint_dir``: write ``checkpoint-<step>/`` every ``save_steps`` steps and at the end (and on a stop).
        ``resume_from``: a checkpoint directory; training continues at its ``global_step + 1`` and matches an
        uninterrupted run. ``should_stop()`` is asked after every step; when it says yes a checkpoint is saved and the
        summary comes back with ``"interrupted": True``.

        Summary: ``steps``, ``first_reward_mean`` / ``first_kl`` (means over the first ``min(5, steps)`` steps),
        ``last_reward_mean`` / ``last_kl`` (over the last ``min(5, steps)``), ``interrupted`` and ``history`` (every
        step's statistics, including steps before a resume).
        """
        cfg = self.config
        if resume_from is not None:
            checkpoint.load(self, Path(resume_from))
        saved_at = self.global_step if resume_from is not None else -1
        interrupted = False
        while self.global_step < cfg.max_steps:
            self.step()
            if checkpoint_dir is not None and self.global_step % cfg.save_steps == 0:
                checkpoint.save(self, Path(checkpoint_dir))
                saved_at = self.global_step
            if should_stop is not None and self._any_process(bool(should_stop())):
                interrupted = self.global_step < cfg.max_steps
                break
        if checkpoint_dir is not None and saved_at != self.global_step and self.history:
            checkpoint.save(self, Path(checkpoint_dir))
        return self.summary(interrupted=interrupted)

    def summary(self, interrupted: bool = False) -> dict[str, Any]:
        h = self.history
        k = min(5, len(h))

        def mean(rows: list[dict[str, Any]], key: str) -> float | None:
            return sum(r[key] for r in rows) / len(rows) if rows else None

        return {
            "steps": self.global_step,
            "first_reward_mean": mean(h[:k], "reward_mean"),
            "last_reward_mean": mean(h[len(h) - k :], "reward_mean"),
            "first_kl": mean(h[:k], "kl"),
            "last_kl": mean(h[len(h) - k :], "kl"),
            "interrupted": interrupted,
            "history": [dict(r) for r in h],
        }

    # ------------------------------------------------------------ helpers

    def _next_prompts(self) -> list[list[int]]:
        """This process's ``batch_size`` prompts of the next step; the ``k``-th prompt of the endless sequence is
        ``randperm(n, seed + k // n)[k % n]``."""
        n, bs, acc = len(self.prompts), self.config.batch_size, self.accelerator
        start = self.cursor + acc.process_index * bs
        batch = []
        for k in range(start, start + bs):
            if k // n != self._order_epoch:
                self._order_epoch = k // n
                gen = torch.Generator().manual_seed(self.config.seed + self._order_epoch)
                self._order = torch.randperm(n, generator=gen).tolist()
            batch.append(self.prompts[self._order[k % n]])
        self.cursor += bs * acc.num_processes
        return batch

    def _any_process(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        t = torch.tensor(float(flag), device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, "sum").item() > 0)

    def _check_finite(self, value: torch.Tensor, what: Callable[[], str]) -> None:
        """Raise ``NonFinitePPOLoss`` naming the step when ``value`` holds NaN/inf (on any process)."""
        if self._any_process(not bool(torch.isfinite(value).all())):
            raise NonFinitePPOLoss(
                f"PPO step {self.global_step + 1}: {what()} is not finite; the last good checkpoint is kept"
            )


def _disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (PPO compares log-probabilities across forward passes)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
