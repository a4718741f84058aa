"""``ValueModel``: PPO's critic, a transformer backbone with a one-output linear head applied to every token."""

from __future__ import annotations

import torch
from torch import nn


class ValueModel(nn.Module):
    """A critic: a transformer backbone and a linear head giving one value per token, ``values = head(h)[..., 0]``.

    ``forward(input_ids, attention_mask, position_ids=None) -> values [B, T]`` (float32), where ``values[:, t]`` is
    the value of the state after reading tokens ``0..t``. All of its weights train.
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
