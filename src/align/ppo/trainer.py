"""Actor-critic PPO for causal language models (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022).

The policy is a LoRA adapter (a peft ``PeftModel``) on a causal LM; the reference policy is the *same* model with the
adapter disabled, so no second copy of the weights is held. The critic is a separate ``ValueModel`` (a transformer
backbone with a one-output linear head), started from the reward model when there is one.

One step (``PPOTrainer.step``):

1. rollout: ``batch_size`` prompts (left-padded) -> sample completions; log-probabilities of the sampled tokens under
   the policy and under the reference (adapter disabled); values; scores from ``reward_fn``;
2. per-token rewards ``r_t = -beta * (logp_t - logp_ref_t)``, plus the score on the last response token;
3. GAE advantages and returns; advantages whitened over the batch;
4. ``ppo_epochs`` passes over shuffled minibatches of ``mini_batch_size`` rollouts, one optimizer step each, on
   ``policy_loss + vf_coef * value_loss``;
5. the KL coefficient ``beta`` is updated (adaptive controller) from the measured KL.

Distributed use: everything goes through an ``accelerate.Accelerator`` (single device or DDP). ``batch_size`` is per
process; prompts are dealt so that processes see different prompts; logged statistics are averaged over processes.
FSDP and DeepSpeed are not supported (generation and the optimizer checkpoint assume whole, replicated weights).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import shutil
import time
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from align.errors import NonFiniteLoss
from align.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    policy_loss,
    response_mask,
    value_loss,
)

RewardFn = Callable[[list[list[int]], list[list[int]]], Any]
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


class NonFinitePPOLoss(NonFiniteLoss, FloatingPointError):
    """A PPO loss (or score) was NaN/inf. Both an ``align`` ``NonFiniteLoss`` and a builtin ``FloatingPointError``."""


# ---------------------------------------------------------------- config


@dataclass
class PPOConfig:
    """Hyper-parameters of ``PPOTrainer``. Defaults follow the "PPO for LMs" recipe (Ziegler et al. 2019).

    ``learning_rate`` is the policy's: 1e-5 suits full weights, but the policy here is a LoRA adapter and wants
    ~1e-4..1e-3. ``value_learning_rate`` (default: ``learning_rate``) is the value model's, all of whose weights train.
    """

    learning_rate: float = 1e-5
    max_steps: int = 20
    batch_size: int = 8  # prompts per rollout step (per process)
    mini_batch_size: int = 4  # rollouts per optimizer step
    ppo_epochs: int = 4  # passes over each rollout batch
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    cliprange: float = 0.2  # policy ratio clip epsilon
    cliprange_value: float = 0.2  # value clip, in value units
    vf_coef: float = 0.1
    kl_coef: float = 0.05  # beta (initial beta when adaptive)
    adaptive_kl: bool = False
    target_kl: float = 6.0  # per-sequence KL the adaptive controller steers towards (nats)
    kl_horizon: int = 10000
    whiten_rewards: bool = False  # rescale per-token rewards (no mean shift) before GAE
    max_grad_norm: float = 1.0  # clipped separately for the policy and the value model
    seed: int = 42
    save_steps: int = 10
    save_total_limit: int = 2
    logging_steps: int = 1
    # additions beyond the core recipe
    value_learning_rate: float | None = None
    weight_decay: float = 0.0
    disable_dropout: bool = True  # dropout would make the rollout's logprobs disagree with the training pass
    forward_batch_size: int | None = None  # rows per no-grad forward in the rollout (default: mini_batch_size)

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"PPOConfig.{field} {why}, got {getattr(self, field)!r}")

        for f in ("max_steps", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "save_steps"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise bad(f, "must be a positive integer")
        for f in ("save_total_limit", "logging_steps", "kl_horizon"):
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


# `from __future__ import annotations` leaves the field types as strings; resolve them so that tools which read
# `dataclasses.fields(PPOConfig)[i].type` (align.trl_compat's recipe checks, HfArgumentParser) see real types.
_HINTS = typing.get_type_hints(PPOConfig)
for _field in dataclasses.fields(PPOConfig):
    _field.type = _HINTS[_field.name]
del _HINTS, _field


# ---------------------------------------------------------------- value model


class ValueModel(nn.Module):
    """A critic: a transformer backbone and a linear head giving one value per token, ``values = head(h)[..., 0]``.

    ``forward(input_ids, attention_mask, position_ids=None) -> values [B, T]`` (float32), where ``values[:, t]`` is
    the value of the state after reading tokens ``0..t``.

    All of its weights are trained (it is small next to the policy in our uses; a LoRA value model can come later).
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        if head.out_features != 1:
            raise ValueError(f"the value head must have one output, this one has {head.out_features}")
        self.backbone = backbone
        self.head = head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1).float()

    @classmethod
    def from_sequence_classifier(cls, model: nn.Module) -> ValueModel:
        """Reuse a ``AutoModelForSequenceClassification`` (``num_labels=1``, e.g. the reward model): its backbone and
        its score head, so the critic starts from the reward model (InstructGPT).

        The head is looked up as ``model.score`` (llama, mistral, qwen, gpt2, ...), then ``classifier``, ``v_head``,
        ``value_head``; it must be an ``nn.Linear`` with one output. A peft model is merged first
        (``merge_and_unload``). The modules are shared with ``model``, not copied: do not keep using ``model``.
        """
        model = _merged(model)
        head = None
        for name in ("score", "classifier", "v_head", "value_head"):
            module = getattr(model, name, None)
            if module is not None:
                head = module
                break
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"{type(model).__name__}: no per-token linear score head found (looked for `score`, `classifier`, "
                f"`v_head`, `value_head`; found {type(head).__name__}); build ValueModel(backbone, head) directly"
            )
        if head.out_features != 1:
            raise ValueError(
                f"{type(model).__name__} has num_labels={head.out_features}; a reward/value model needs num_labels=1"
            )
        return cls(_backbone(model), head)

    @classmethod
    def from_causal_lm(cls, model: nn.Module) -> ValueModel:
        """A critic from a causal LM's backbone (``lm_head`` dropped) and a fresh zero-initialised head (values start
        at 0). Pass a separate copy of the weights: the backbone is trained. A peft model is merged first."""
        model = _merged(model)
        backbone = _backbone(model)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        ref = next(backbone.parameters())
        head = nn.Linear(config.hidden_size, 1, bias=True, device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return cls(backbone, head)


def _merged(model: nn.Module) -> nn.Module:
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def _backbone(model: nn.Module) -> nn.Module:
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if backbone is None:
        backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model:
        raise ValueError(f"{type(model).__name__}: cannot find its transformer backbone (base_model_prefix={prefix!r})")
    return backbone


# ---------------------------------------------------------------- trainer


@dataclass
class Rollout:
    """One batch of rollouts. Prompt tokens are left-padded and response tokens right-padded; the response columns are
    the last ``R = response.shape[1]`` columns of ``input_ids``. Per-token tensors are ``[B, R]``."""

    input_ids: torch.Tensor  # [B, P + R] prompt and response
    attention_mask: torch.Tensor  # [B, P + R]
    position_ids: torch.Tensor  # [B, P + R]
    mask: torch.Tensor  # [B, R] valid response tokens
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor  # [B]


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
        eos_token_id: one id or several that end a completion (default ``tokenizer.eos_token_id``).
        pad_token_id: default ``tokenizer.pad_token_id``, else the (first) EOS id.
        generation_kwargs: extra/overriding keyword arguments for ``generate`` (beware: any processor that changes
            the sampling distribution makes the recorded log-probabilities differ from the sampling ones).
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
        self.accelerator = accelerator
        self.config = config
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.log_fn = log_fn

        eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("no EOS token id: pass eos_token_id= or use a tokenizer with an eos_token")
        self.eos_token_ids = [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
        pad = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_ids[0]

        from accelerate.utils import set_seed

        set_seed(config.seed + accelerator.process_index)  # sampling in generate() uses the global torch RNG
        self._generator = torch.Generator().manual_seed(config.seed)  # minibatch shuffles

        if config.disable_dropout:
            _disable_dropout(policy)
            _disable_dropout(value_model)
        self._policy_params = [p for p in policy.parameters() if p.requires_grad]
        if not self._policy_params:
            raise ValueError("the policy has no trainable parameters (is the LoRA adapter active and trainable?)")
        for p in value_model.parameters():
            p.requires_grad_(True)
        self._value_params = list(value_model.parameters())
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
        base_forward = self._unwrapped_policy.get_base_model().forward
        self._logits_to_keep = "logits_to_keep" in inspect.signature(base_forward).parameters

        if config.adaptive_kl:
            self.kl_ctl: FixedKLController | AdaptiveKLController = AdaptiveKLController(
                config.kl_coef, config.target_kl, config.kl_horizon
            )
        else:
            self.kl_ctl = FixedKLController(config.kl_coef)
        self.generation_kwargs = {
            "do_sample": True,
            "temperature": config.temperature,
            "top_k": config.top_k,
            "top_p": config.top_p,
            "max_new_tokens": config.max_new_tokens,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_ids if len(self.eos_token_ids) > 1 else self.eos_token_ids[0],
            # Neutralise whatever the model's generation_config.json sets, so that we sample from softmax(z / T)
            # (up to top-k/top-p), the distribution whose log-probabilities PPO uses.
            "num_beams": 1,
            "num_return_sequences": 1,
            "repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "typical_p": 1.0,
            "min_p": None,
            "epsilon_cutoff": 0.0,
            "eta_cutoff": 0.0,
            "min_length": 0,
            "bad_words_ids": None,
            "suppress_tokens": None,
            "begin_suppress_tokens": None,
            "sequence_bias": None,
            "forced_bos_token_id": None,
            "forced_eos_token_id": None,
            "use_cache": True,
            **(generation_kwargs or {}),
        }

        self.global_step = 0
        self.cursor = 0  # index of the next prompt in the endless sequence of seeded shuffles
        self.history: list[dict[str, Any]] = []
        self._order_epoch = -1
        self._order: list[int] = []

    # ------------------------------------------------------------ helpers

    @property
    def _unwrapped_policy(self) -> Any:
        return self.accelerator.unwrap_model(self.policy)

    @property
    def _unwrapped_value(self) -> ValueModel:
        return self.accelerator.unwrap_model(self.value_model)

    def _prompt_index(self, k: int) -> int:
        """The ``k``-th prompt of the endless sequence: pass ``e = k // n`` uses ``randperm(n, seed + e)``."""
        n = len(self.prompts)
        epoch = k // n
        if epoch != self._order_epoch:
            gen = torch.Generator().manual_seed(self.config.seed + epoch)
            self._order = torch.randperm(n, generator=gen).tolist()
            self._order_epoch = epoch
        return self._order[k % n]

    def _next_prompts(self) -> list[list[int]]:
        bs, acc = self.config.batch_size, self.accelerator
        start = self.cursor + acc.process_index * bs
        batch = [self.prompts[self._prompt_index(k)] for k in range(start, start + bs)]
        self.cursor += bs * acc.num_processes
        return batch

    def _response_logits(self, model: Any, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, r: int):
        """Logits (float32, divided by the temperature) that predict the last ``r`` tokens: ``[b, r, V]``."""
        kwargs: dict[str, Any] = {"logits_to_keep": r + 1} if self._logits_to_keep else {}
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, **kwargs)
        return out.logits[:, -(r + 1) : -1].float() / self.config.temperature

    @staticmethod
    def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``log softmax(logits)[token] = z_token - logsumexp(z)`` without materialising the full log-softmax."""
        picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)

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

    # ------------------------------------------------------------ rollout

    @torch.no_grad()
    def _rollout(self, prompts: list[list[int]]) -> Rollout:
        acc, cfg = self.accelerator, self.config
        device = acc.device
        policy, value = self._unwrapped_policy, self._unwrapped_value
        policy.eval()
        value.eval()

        b, p_len = len(prompts), max(len(p) for p in prompts)
        prompt_ids = torch.full((b, p_len), self.pad_token_id, dtype=torch.long)
        prompt_attn = torch.zeros((b, p_len), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: generation continues right after the last prompt token
            prompt_ids[i, p_len - len(p) :] = torch.tensor(p, dtype=torch.long)
            prompt_attn[i, p_len - len(p) :] = 1
        prompt_ids, prompt_attn = prompt_ids.to(device), prompt_attn.to(device)

        sequences = policy.generate(input_ids=prompt_ids, attention_mask=prompt_attn, **self.generation_kwargs)
        response = sequences[:, p_len:]
        r = response.shape[1]
        mask = response_mask(response, self.eos_token_ids)
        response = response.masked_fill(mask == 0, self.pad_token_id)
        input_ids = torch.cat([prompt_ids, response], dim=1)
        attention_mask = torch.cat([prompt_attn, mask], dim=1)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() computes them

        logprobs, ref_logprobs, values = [], [], []
        chunk = cfg.forward_batch_size or cfg.mini_batch_size
        for s in range(0, b, chunk):
            ids, attn, pos = input_ids[s : s + chunk], attention_mask[s : s + chunk], position_ids[s : s + chunk]
            tokens = ids[:, -r:]
            logprobs.append(self._token_logprobs(self._response_logits(policy, ids, attn, pos, r), tokens))
            with policy.disable_adapter():  # the reference policy: the same weights without the adapter
                ref_logprobs.append(self._token_logprobs(self._response_logits(policy, ids, attn, pos, r), tokens))
            values.append(value(ids, attn, pos)[:, -(r + 1) : -1])

        completions = [row[: int(n)].tolist() for row, n in zip(response.cpu(), mask.sum(1).cpu(), strict=True)]
        scores = self.reward_fn([list(p) for p in prompts], completions)
        scores = torch.as_tensor(scores, dtype=torch.float32).to(device).reshape(-1)
        if scores.shape[0] != b:
            raise ValueError(f"reward_fn returned {scores.shape[0]} scores for {b} completions")
        self._check_finite(scores, lambda: f"a reward_fn score ({scores.tolist()})")
        return Rollout(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            mask=mask,
            logprobs=torch.cat(logprobs),
            ref_logprobs=torch.cat(ref_logprobs),
            values=torch.cat(values),
            scores=scores,
        )

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
        ro = self._rollout(self._next_prompts())
        mask, r = ro.mask, ro.mask.shape[1]
        maskf = mask.float()

        kl_coef = self.kl_ctl.value
        rewards, kl = kl_penalized_rewards(ro.logprobs, ro.ref_logprobs, ro.scores, mask, kl_coef)
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, ro.values, mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, mask)

        self.policy.train()
        self.value_model.train()
        totals: dict[str, list[torch.Tensor]] = {}
        b = mask.shape[0]
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(b, generator=self._generator).to(mask.device)
            for s in range(0, b, cfg.mini_batch_size):
                idx = perm[s : s + cfg.mini_batch_size]
                ids, attn, pos, m = ro.input_ids[idx], ro.attention_mask[idx], ro.position_ids[idx], mask[idx]
                logits = self._response_logits(self.policy, ids, attn, pos, r)
                logprobs = self._token_logprobs(logits, ids[:, -r:])
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
                    "policy_loss": pg_loss.detach(),
                    "value_loss": vf_loss.detach(),
                    "entropy": entropy,
                    **pg_stats,
                    **vf_stats,
                }.items():
                    totals.setdefault(k, []).append(v.float())

        # statistics, averaged over processes
        keys = sorted(totals)
        local = torch.stack([torch.stack(totals[k]).mean() for k in keys])
        train_stats = dict(zip(keys, acc.reduce(local, "mean").tolist(), strict=True))
        seq_kl = kl.sum(1)
        scores_all = acc.gather(ro.scores)
        kl_all = acc.gather(seq_kl)
        roll = torch.stack(
            [
                seq_kl.mean(),
                (-kl_coef * seq_kl).mean(),
                maskf.sum(1).mean(),
                masked_mean(ro.values, mask),
                masked_mean(returns, mask),
            ]
        )
        roll_mean = acc.reduce(roll, "mean").tolist()

        self.global_step += 1
        stats: dict[str, Any] = {
            "step": self.global_step,
            "reward_mean": scores_all.mean().item(),
            "reward_std": scores_all.std(correction=0).item(),
            "kl": roll_mean[0],
            "kl_coef": kl_coef,
            "non_score_reward": roll_mean[1],
            "response_length": roll_mean[2],
            "value_mean": roll_mean[3],
            "return_mean": roll_mean[4],
            **train_stats,
        }
        self.kl_ctl.update(kl_all.mean().item(), n_steps=cfg.batch_size * acc.num_processes)
        stats["seconds"] = time.perf_counter() - t0
        self.history.append(stats)
        if self.log_fn is not None and acc.is_main_process and self.global_step % cfg.logging_steps == 0:
            self.log_fn(dict(stats))
        return stats

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
            self.load_checkpoint(Path(resume_from))
        checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        saved_at = self.global_step if resume_from is not None else -1
        interrupted = False
        while self.global_step < cfg.max_steps:
            self.step()
            if checkpoint_dir is not None and self.global_step % cfg.save_steps == 0:
                self.save_checkpoint(checkpoint_dir)
                saved_at = self.global_step
            if should_stop is not None and self._any_process(bool(should_stop())):
                interrupted = self.global_step < cfg.max_steps
                break
        if checkpoint_dir is not None and saved_at != self.global_step and self.history:
            self.save_checkpoint(checkpoint_dir)
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

    # ------------------------------------------------------------ checkpoints

    def _rng_state(self) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "generator": self._generator.get_state(),
        }

    def save_checkpoint(self, checkpoint_dir: Path) -> Path:
        """Write ``checkpoint_dir/checkpoint-<step>/``: ``adapter/`` (peft, safetensors), ``value.safetensors``,
        ``optimizer.pt``, ``rng_state.pt`` (one entry per process) and, last, ``trainer_state.json`` (global step,
        prompt cursor, KL controller, history, config). Keeps the newest ``save_total_limit`` checkpoints. Every process
        must call it; only the main process writes."""
        from safetensors.torch import save_model

        acc = self.accelerator
        rng = [self._rng_state()]
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            rng = gather_object(rng)
        path = Path(checkpoint_dir) / f"checkpoint-{self.global_step}"
        acc.wait_for_everyone()
        if acc.is_main_process:
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
            # save_embedding_layers=False: only the adapter (the base embeddings never change here); "auto" may
            # also copy the whole embedding matrix or look the base model up on the Hub.
            self._unwrapped_policy.save_pretrained(
                path / "adapter", safe_serialization=True, save_embedding_layers=False
            )
            save_model(self._unwrapped_value, str(path / "value.safetensors"))
            torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
            torch.save(rng, path / "rng_state.pt")
            state = {
                "global_step": self.global_step,
                "cursor": self.cursor,
                "num_processes": acc.num_processes,
                "kl_controller": {"type": type(self.kl_ctl).__name__, **self.kl_ctl.state_dict()},
                "config": dataclasses.asdict(self.config),
                "history": self.history,
            }
            tmp = path / (STATE_FILE + ".tmp")
            tmp.write_text(json.dumps(state, indent=1))
            tmp.replace(path / STATE_FILE)  # last: a checkpoint without it is incomplete
            self._rotate(Path(checkpoint_dir), keep=path)
        acc.wait_for_everyone()
        return path

    def _rotate(self, checkpoint_dir: Path, keep: Path) -> None:
        found = sorted(
            (int(m.group(1)), d)
            for d in checkpoint_dir.iterdir()
            if d.is_dir() and (m := CHECKPOINT_RE.match(d.name)) and d != keep
        )
        for _, d in found[: max(0, len(found) - (self.config.save_total_limit - 1))]:
            shutil.rmtree(d, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything ``save_checkpoint`` wrote: adapter, value model, optimizer, KL controller, RNG states,
        prompt cursor and history. Raises ``ValueError`` for an incomplete checkpoint."""
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file, load_model

        path = Path(path)
        if not (path / STATE_FILE).is_file():
            raise ValueError(f"{path} is not a complete PPO checkpoint (no {STATE_FILE})")
        state = json.loads((path / STATE_FILE).read_text())
        for key in ("seed", "batch_size", "mini_batch_size"):
            if state.get("config", {}).get(key, getattr(self.config, key)) != getattr(self.config, key):
                warnings.warn(
                    f"resuming from {path} with {key}={getattr(self.config, key)} "
                    f"(checkpoint: {state['config'][key]}): the run will not match an uninterrupted one",
                    stacklevel=2,
                )
        acc = self.accelerator
        policy = self._unwrapped_policy
        adapter_file = path / "adapter" / "adapter_model.safetensors"
        result = set_peft_model_state_dict(policy, load_file(str(adapter_file)), adapter_name=policy.active_adapter)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{adapter_file} does not fit the policy's adapter: {result.unexpected_keys[:5]}")
        missing, unexpected = load_model(self._unwrapped_value, str(path / "value.safetensors"), device=str(acc.device))
        if missing or unexpected:
            raise ValueError(f"value.safetensors does not fit the value model (missing {missing}, extra {unexpected})")
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))

        kl_state = dict(state["kl_controller"])
        kl_type = kl_state.pop("type", type(self.kl_ctl).__name__)
        if kl_type != type(self.kl_ctl).__name__:
            warnings.warn(f"checkpoint used {kl_type}, this run {type(self.kl_ctl).__name__}", stacklevel=2)
        self.kl_ctl.load_state_dict(kl_state)
        self.global_step = int(state["global_step"])
        self.cursor = int(state["cursor"])
        self.history = list(state.get("history", []))

        rng = torch.load(path / "rng_state.pt", map_location="cpu", weights_only=True)
        if len(rng) == acc.num_processes:
            mine = rng[acc.process_index]
            torch.set_rng_state(mine["torch"])
            cuda = mine.get("cuda")
            if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
            self._generator.set_state(mine["generator"])
        else:
            warnings.warn(
                f"{path} was written by {len(rng)} process(es), this run has {acc.num_processes}: RNG states are not "
                "restored, so sampling will differ from an uninterrupted run",
                stacklevel=2,
            )


def _disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (PPO compares log-probabilities across forward passes)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
