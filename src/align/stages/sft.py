"""SFT stage on TRL's SFTTrainer: full fine-tuning, LoRA, DoRA, QLoRA.

config -> data -> model -> trainer -> train -> save -> metrics (the skeleton in `align.stages._trl`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, StrictBool

from align.data import TEXT_FORMATS, to_sft
from align.errors import RecipeError
from align.models import torch_dtype
from align.rundir import Plan, StagePlan
from align.spec import TrainSpec, data_names
from align.stages._train import load_policy, set_pad
from align.stages._trl import TRAIN_DEFAULTS, Trained, TRLStage
from align.stages.base import Default, Problem, fmt, loss_line
from align.trl_compat import SFTConfig


class SFTSpec(TrainSpec):
    type: Literal["sft"]
    loss_on: Literal["completion", "all"] = Field("completion", description="completion = prompt tokens masked")
    merge: StrictBool = Field(False, description="also write a merged model (adapter folded into the base)")
    train: dict[str, Any] = Field(default_factory=dict, description="TRL SFTConfig fields, by their TRL names")
    allow_cpu_qlora: StrictBool = Field(False, description="train QLoRA on CPU even if the gradient check disagrees")


class SFT(TRLStage):
    name = "sft"
    spec = SFTSpec
    formats = TEXT_FORMATS
    trainer_config = SFTConfig
    trainer_name = "SFTTrainer"
    adapters = ("lora", "dora", "qlora", "full")
    produces_policy = True
    defaults = (
        *TRAIN_DEFAULTS,
        Default("packing", True, "best-fit-decreasing packing, padding-free: no compute spent on pad tokens"),
        Default("include_num_input_tokens_seen", "non_padding", "tokens/s in metrics.json counts real tokens"),
        Default("learning_rate", 2e-4, "TRL's 2e-5 suits full fine-tuning; adapters want ~10x more", "adapter"),
        Default("learning_rate", 2e-5, "TRL's default for full fine-tuning, stated", "full"),
    )

    def check_fields(self, spec: SFTSpec, where: str) -> list[Problem]:
        problems = []
        for key in ("completion_only_loss", "assistant_only_loss"):
            if key in spec.train:
                problems.append(
                    (f"{where}.train.{key}", "set `loss_on: completion` or `loss_on: all` on the stage instead")
                )
        if spec.adapter.type == "full" and "adapter" in spec.model_fields_set:
            extra = {"r", "alpha", "dropout", "target_modules"} & spec.adapter.model_fields_set
            if extra:
                problems.append((f"{where}.adapter", f"{sorted(extra)} have no effect with `type: full`; remove them"))
        return problems

    def check_inputs(self, plan: Plan, sp: StagePlan, formats: dict[str, str]) -> list[Problem]:
        """A chat template where the data holds chat messages; QLoRA's hardware."""
        problems = []
        if sp.stage.adapter.type == "qlora":
            from align.quantization import qlora_unavailable_reason

            reason = qlora_unavailable_reason()
            if reason:
                problems.append((f"{sp.where}.adapter.type", f"qlora cannot run here: {reason}; use `lora` instead"))
        return problems

    def fixed_args(self, plan: Plan, sp: StagePlan, args: dict[str, Any]) -> dict[str, Any]:
        spec = sp.stage
        fixed: dict[str, Any] = {"completion_only_loss": spec.loss_on == "completion"}
        has_eval = spec.eval_data is not None or any(
            plan.recipe.datasets[n].eval_fraction or plan.recipe.datasets[n].eval_path for n in data_names(spec.data)
        )
        if args.get("eval_strategy", "no") != "no" and not has_eval:
            fixed["eval_strategy"] = "no"  # nothing to evaluate on
        return fixed

    def convert(self, ds: Any, fmt: str, *, chat: bool, spec: SFTSpec, tok: Any) -> Any:
        return to_sft(ds, fmt, chat=chat, loss_on=spec.loss_on, eos=tok.eos_token)

    def load_model(self, plan: Plan, sp: StagePlan, source: dict[str, Any], tokenizer: Any) -> Any:
        import torch

        kw: dict[str, Any] = {}
        if sp.stage.adapter.type == "qlora":
            kw["quantization_config"] = qlora_config(plan, sp.stage)
        model = load_policy(plan, source, sp.partial_dir, **kw)
        if kw and not torch.cuda.is_available():
            from align.quantization import keep_4bit_train_layout

            keep_4bit_train_layout(model)  # else an eval forward repacks weights into a layout with no backward
        if model.generation_config is not None and tokenizer.pad_token_id is not None:
            set_pad(model, tokenizer)
        return model

    def stage_metrics(self, plan: Plan, sp: StagePlan, t: Trained) -> dict[str, Any]:
        m: dict[str, Any] = {"tokens_seen": int(t.trainer.state.num_input_tokens_seen or 0)}
        m["dtype"] = str(torch_dtype(plan.recipe.model.dtype)).replace("torch.", "")
        if t.common.get("train_runtime_s"):
            m["tokens_per_s"] = m["tokens_seen"] / t.common["train_runtime_s"]
        if t.eval_ds is not None:
            ev = t.trainer.evaluate()
            m["eval_loss"] = ev["eval_loss"]
            m["eval_perplexity"] = math.exp(min(ev["eval_loss"], 50))
        return m

    def headline(self, m: dict[str, Any]) -> str:
        return f"{loss_line(m)}, {fmt(m, 'tokens_per_s', '.0f')} tok/s"


def qlora_config(plan: Plan, spec: SFTSpec) -> Any:
    """4-bit base weights; on CPU only after the gradient check agrees (bitsandbytes has no CPU autograd kernel)."""
    import torch

    from align.quantization import bnb_4bit_config, check_qlora_gradients

    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if not torch.cuda.is_available():
        res = check_qlora_gradients(str(plan.base.path), spec.adapter.target_modules, keep_train_layout=True)
        print(f"[align] QLoRA gradient check on CPU: max relative error {res.max_rel_err:.2e} ({res.detail})")
        if not res.ok and not spec.allow_cpu_qlora:
            raise RecipeError(
                f"QLoRA gradients on this CPU disagree with the dequantized reference (max relative error "
                f"{res.max_rel_err:.2e}); use `adapter.type: lora`, or set `allow_cpu_qlora: true` to train anyway",
                f"stages.{spec.name}.adapter.type",
            )
    return bnb_4bit_config(compute)
