"""The rollout half of a PPO step: sample completions from the policy, then score them.

``Sampler.rollout(prompts)`` left-pads the prompts, samples a completion for each, and returns a ``Rollout`` holding
the log-probabilities of the sampled tokens under the policy and under the reference (the same model with its LoRA
adapter disabled), the value model's values, and the reward function's scores.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from align.ppo.config import PPOConfig
from align.ppo.core import response_mask

RewardFn = Callable[[list[list[int]], list[list[int]]], Any]


@dataclass
class Rollout:
    """One batch of rollouts. Prompt tokens are left-padded and response tokens right-padded; the response columns are
    the last ``R = mask.shape[1]`` columns of ``input_ids``. Per-token tensors are ``[B, R]``."""

    input_ids: torch.Tensor  # [B, P + R] prompt and response
    attention_mask: torch.Tensor  # [B, P + R]
    position_ids: torch.Tensor  # [B, P + R]
    mask: torch.Tensor  # [B, R] valid response tokens
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor  # [B]


class Sampler:
    """Makes a ``Rollout`` from prompts with a peft policy, its value model and a reward function.

    ``eos_token_id`` (one id or several) ends a completion, default ``tokenizer.eos_token_id``; ``pad_token_id``
    defaults to ``tokenizer.pad_token_id``, else the (first) EOS id. ``generation_kwargs`` extend or override the
    arguments of ``generate`` (beware: any processor that changes the sampling distribution makes the recorded
    log-probabilities differ from the sampling ones).
    """

    def __init__(
        self,
        policy: Any,
        value_model: nn.Module,
        reward_fn: RewardFn,
        config: PPOConfig,
        tokenizer: Any,
        *,
        device: torch.device,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        generation_kwargs: dict[str, Any] | None = None,
    ):
        eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("no EOS token id: pass eos_token_id= or use a tokenizer with an eos_token")
        self.eos_token_ids = [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
        pad = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_ids[0]

        self.policy, self.value_model, self.reward_fn, self.device = policy, value_model, reward_fn, device
        self.temperature = config.temperature
        self.forward_batch_size = config.forward_batch_size or config.mini_batch_size
        self.logits_to_keep = "logits_to_keep" in inspect.signature(policy.get_base_model().forward).parameters
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

    def response_logits(self, model: Any, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor, r: int):
        """Logits (float32, divided by the temperature) that predict the last ``r`` tokens: ``[b, r, V]``."""
        kwargs: dict[str, Any] = {"logits_to_keep": r + 1} if self.logits_to_keep else {}
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, **kwargs)
        return out.logits[:, -(r + 1) : -1].float() / self.temperature

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]]) -> Rollout:
        """Sample one completion per prompt and score it. Scores may be NaN: the caller checks them."""
        policy, value = self.policy, self.value_model
        policy.eval()
        value.eval()

        prompt_ids, prompt_attn = self._left_pad(prompts)
        sequences = policy.generate(input_ids=prompt_ids, attention_mask=prompt_attn, **self.generation_kwargs)
        response = sequences[:, prompt_ids.shape[1] :]
        r = response.shape[1]
        mask = response_mask(response, self.eos_token_ids)
        response = response.masked_fill(mask == 0, self.pad_token_id)
        input_ids = torch.cat([prompt_ids, response], dim=1)
        attention_mask = torch.cat([prompt_attn, mask], dim=1)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() computes them

        logprobs, ref_logprobs, values = [], [], []
        b, chunk = len(prompts), self.forward_batch_size
        for s in range(0, b, chunk):
            ids, attn, pos = input_ids[s : s + chunk], attention_mask[s : s + chunk], position_ids[s : s + chunk]
            tokens = ids[:, -r:]
            logprobs.append(token_logprobs(self.response_logits(policy, ids, attn, pos, r), tokens))
            with policy.disable_adapter():  # the reference policy: the same weights without the adapter
                ref_logprobs.append(token_logprobs(self.response_logits(policy, ids, attn, pos, r), tokens))
            values.append(value(ids, attn, pos)[:, -(r + 1) : -1])

        completions = [row[: int(n)].tolist() for row, n in zip(response.cpu(), mask.sum(1).cpu(), strict=True)]
        scores = self.reward_fn([list(p) for p in prompts], completions)
        scores = torch.as_tensor(scores, dtype=torch.float32).to(self.device).reshape(-1)
        if scores.shape[0] != b:
            raise ValueError(f"reward_fn returned {scores.shape[0]} scores for {b} completions")
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

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left padding, so that generation continues right after each prompt's last token."""
        b, p_len = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((b, p_len), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((b, p_len), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, p_len - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[i, p_len - len(p) :] = 1
        return ids.to(self.device), attn.to(self.device)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[token] = z_token - logsumexp(z)`` without materialising the full log-softmax."""
    picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)
