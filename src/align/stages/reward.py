"""Reward-model stage on TRL's RewardTrainer: a one-score sequence classifier trained on preference pairs.

config -> data -> model -> trainer -> train -> save -> metrics (the skeleton in `align.stages._trl`).

The input is the last policy stage (the SFT model, as in InstructGPT) or `from:`; an adapter input is
folded into its base first. The output is always a merged reward model in safetensors (`model/`), loaded
with `AutoModelForSequenceClassification` (recorded in stage.json), so later stages need no peft code.
Held-out metrics: pairwise accuracy and mean margin; with no held-out data named, 10% is held out.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from align import distributed
from align.data import PAIR_FORMATS, to_preference
from align.errors import StageFailed
from align.memory import Workload
from align.models import torch_dtype
from align.rundir import Plan, StagePlan
from align.spec import TrainSpec
from align.stages._train import input_folder, save_policy, set_pad
from align.stages._trl import TRAIN_DEFAULTS, Trained, TRLStage
from align.stages.base import Default, fmt, loss_line
from align.trl_compat import RewardConfig

AUTO_HOLDOUT = 0.1
PUSH_WHAT = "reward"  # `align push --what reward` ships a reward stage's model


class RewardSpec(TrainSpec):
    """A reward model (sequence classifier, one score) on preference pairs, via TRL's RewardTrainer.

    Its input defaults to the last policy stage (the SFT model, as in InstructGPT); it writes a merged
    reward model that online RL stages read."""

    type: Literal["reward"]
    train: dict[str, Any] = Field(default_factory=dict, description="TRL RewardConfig fields, by their TRL names")


class Reward(TRLStage):
    name = "reward"
    spec = RewardSpec
    formats = PAIR_FORMATS
    trainer_config = RewardConfig
    trainer_name = "RewardTrainer"
    produces_reward = True
    evaluate_before = True
    peft_task = "SEQ_CLS"
    memory = Workload(sequences_per_example=2, score_head=True)
    defaults = (
        *TRAIN_DEFAULTS,
        Default("learning_rate", 2e-4, "a new score head and an adapter want ~10x the full-weight rate", "adapter"),
        Default("learning_rate", 1e-5, "full fine-tuning of a reward model: InstructGPT's order of magnitude", "full"),
    )

    def convert(self, ds: Any, fmt: str, *, chat: bool, spec: Any, tok: Any) -> Any:
        return to_preference(ds, fmt, chat=chat)

    def load_data(self, plan: Plan, sp: StagePlan, tokenizer: Any) -> tuple[Any, Any, str | None]:
        train_ds, eval_ds, _ = super().load_data(plan, sp, tokenizer)
        return holdout(train_ds, eval_ds, plan.recipe.seed)

    def load_model(self, plan: Plan, sp: StagePlan, source: dict[str, Any], tokenizer: Any) -> Any:
        """A one-label sequence classifier on the input model's backbone (its head is new, seeded)."""
        folder = input_folder(plan, source, sp.partial_dir, always=True)  # the classifier loads from a folder
        model = classifier_from(plan, folder, seed=plan.recipe.seed)
        set_pad(model, tokenizer)
        return model

    def save(
        self,
        plan: Plan,
        sp: StagePlan,
        trl_trainer: Any,
        tokenizer: Any,
        out: Path,
        source: dict[str, Any],
        trained: dict[str, Any],
    ) -> tuple[dict[str, Any], str | None]:
        """Always a merged classifier, so online RL stages load it with transformers alone.

        With an adapter: the gathered adapter is written and verified, then the main process folds it into a
        fresh copy of the input classifier (never the sharded in-training one) and checks the merged model."""
        from peft import PeftModel

        output = {"kind": "reward_model", "path": "model", "loader": "transformers.AutoModelForSequenceClassification"}
        model = trl_trainer.model
        if not hasattr(model, "peft_config"):
            save_policy(model, tokenizer, out, source, trained=trained, stage=sp.name, merge=False, trainer=trl_trainer)
            return output, None
        adapter_dir = sp.partial_dir / "reward-adapter"
        save_policy(model, tokenizer, adapter_dir, source, trained=trained, stage=sp.name, merge=False)
        folder = input_folder(plan, source, sp.partial_dir, always=True)  # every rank: it may wait at a barrier
        if distributed.is_main():
            with distributed.no_zero_init():
                base = classifier_from(plan, folder, seed=plan.recipe.seed)
                set_pad(base, tokenizer)
                merged = PeftModel.from_pretrained(base, adapter_dir / "adapter").merge_and_unload()
            merged.save_pretrained(out / "model", safe_serialization=True)
            tokenizer.save_pretrained(out / "model")
            saved = distributed.saved_tensors(out / "model")
            if not saved or any(t.numel() == 0 for t in saved.values()):
                raise StageFailed(f"stage `{sp.name}`: the merged reward model in {out / 'model'} is empty or broken")
            shutil.rmtree(adapter_dir, ignore_errors=True)
            shutil.rmtree(sp.partial_dir / "input-merged", ignore_errors=True)
        return output, None

    def stage_metrics(self, plan: Plan, sp: StagePlan, t: Trained) -> dict[str, Any]:
        m: dict[str, Any] = {"heldout": t.heldout}
        if t.eval_ds is not None:
            ev = t.trainer.evaluate()
            m.update(
                {
                    "eval_pairs": len(t.eval_ds),
                    "eval_accuracy": ev.get("eval_accuracy"),
                    "eval_margin": ev.get("eval_margin"),
                    "eval_loss": ev.get("eval_loss"),
                    "eval_accuracy_before": t.before.get("eval_accuracy"),
                    "eval_margin_before": t.before.get("eval_margin"),
                }
            )
        return m

    def headline(self, m: dict[str, Any]) -> str:
        acc = f"{fmt(m, 'eval_accuracy_before')} -> {fmt(m, 'eval_accuracy')}, margin {fmt(m, 'eval_margin')}"
        return f"{loss_line(m)}; held-out accuracy {acc}"

    def writes(self, spec: Any) -> str:
        return "reward model/ (merged classifier)"


def holdout(train_ds: Any, eval_ds: Any, seed: int) -> tuple[Any, Any, str]:
    """Preference stages always report held-out metrics: named held-out data, else 10% of the pairs."""
    if eval_ds is not None:
        return train_ds, eval_ds, "eval split of the recipe"
    if len(train_ds) < 10:
        return train_ds, None, "none (fewer than 10 pairs)"
    parts = train_ds.train_test_split(test_size=AUTO_HOLDOUT, seed=seed)
    return parts["train"], parts["test"], f"auto: {AUTO_HOLDOUT:.0%} of the pairs"


def classifier_from(plan: Plan, folder: Path, *, seed: int) -> Any:
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(
        folder,
        num_labels=1,
        dtype=torch_dtype(plan.recipe.model.dtype),
        use_safetensors=True,
        trust_remote_code=plan.recipe.model.trust_remote_code,
    )
