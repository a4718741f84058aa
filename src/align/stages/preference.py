"""Offline preference stages on TRL's trainers: `dpo` (DPOTrainer), `kto` (KTOTrainer), `orpo` (ORPOTrainer).

config -> data -> model -> trainer -> train -> save -> metrics (the skeleton in `align.stages._trl`).

The policy is the previous policy stage's output (an SFT adapter is folded into its base first), with a
new adapter on top. DPO and KTO need a reference model: with an adapter it is the same weights with the
adapter disabled (TRL does this when `ref_model` is None and the model is a PeftModel), so no second
copy is held in memory. ORPO has no reference. Loss variants go through TRL's own fields
(`train.loss_type`, `train.beta`, ...). Held-out reward accuracy and margins are measured before and
after training (before training the policy equals the reference, so every implicit reward is 0 and
TRL's strict `chosen > rejected` accuracy is 0).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, StrictBool

from align.data import PAIR_FORMATS, to_preference
from align.memory import Workload
from align.rundir import Plan, StagePlan
from align.spec import TrainSpec, as_number
from align.stages._trl import TRAIN_DEFAULTS, Trained, TRLStage
from align.stages.base import Default, Problem, fmt, loss_line
from align.stages.reward import holdout
from align.trl_compat import DPOConfig, KTOConfig, orpo_config


class PreferenceSpec(TrainSpec):
    """Offline preference optimisation on pairs. With an adapter the reference model is the same weights with
    the adapter disabled (no second copy)."""

    merge: StrictBool = Field(False, description="also write a merged model (adapter folded into the base)")
    train: dict[str, Any] = Field(default_factory=dict, description="the TRL trainer's config fields")


class DPOSpec(PreferenceSpec):
    type: Literal["dpo"]


class KTOSpec(PreferenceSpec):
    type: Literal["kto"]


class ORPOSpec(PreferenceSpec):
    type: Literal["orpo"]


class PreferenceStage(TRLStage):
    formats = PAIR_FORMATS
    produces_policy = True
    evaluate_before = True
    with_reference: ClassVar[bool] = True
    memory = Workload(sequences_per_example=2, reference_when_full=True)
    defaults = (
        *TRAIN_DEFAULTS,
        Default(
            "learning_rate", 5e-5, "preference tuning moves less than SFT; TRL's 1e-6 suits full weights", "adapter"
        ),
    )

    def check_fields(self, spec: Any, where: str) -> list[Problem]:
        """Values TRL takes without a word: a negative `beta` trains towards the rejected answers, 0 learns nothing."""
        problems = []
        beta, smoothing = as_number(spec.train.get("beta")), as_number(spec.train.get("label_smoothing"))
        if beta is not None and not beta > 0:
            problems.append(
                (f"{where}.train.beta", f"must be greater than 0 (got {spec.train['beta']!r}); 0.1 is usual")
            )
        if smoothing is not None and not 0 <= smoothing < 0.5:
            problems.append(
                (
                    f"{where}.train.label_smoothing",
                    f"must be at least 0 and below 0.5 (got {spec.train['label_smoothing']!r}): the share of "
                    "pairs assumed flipped; 0.5 or more trains towards the rejected answers",
                )
            )
        return problems

    def convert(self, ds: Any, fmt: str, *, chat: bool, spec: Any, tok: Any) -> Any:
        return to_preference(ds, fmt, chat=chat)

    def load_data(self, plan: Plan, sp: StagePlan, tokenizer: Any) -> tuple[Any, Any, str | None]:
        train_ds, eval_ds, _ = super().load_data(plan, sp, tokenizer)
        return holdout(train_ds, eval_ds, plan.recipe.seed)

    def trainer_kwargs(self, plan: Plan, sp: StagePlan, eval_ds: Any) -> dict[str, Any]:
        # the reference: the same weights with the adapter disabled (None), so no second copy is held
        return {"eval_dataset": eval_ds, **({"ref_model": None} if self.with_reference else {})}

    def stage_metrics(self, plan: Plan, sp: StagePlan, t: Trained) -> dict[str, Any]:
        m: dict[str, Any] = {"heldout": t.heldout}
        if t.eval_ds is not None:
            ev = t.trainer.evaluate()
            m["eval_pairs"] = len(t.eval_ds)
            for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen"):
                if key in ev:
                    name = key.replace("eval_rewards/", "eval_reward_")
                    m[name] = ev[key]
                    m[f"{name}_before"] = t.before.get(key)
        return m

    def headline(self, m: dict[str, Any]) -> str:
        acc = f"reward accuracy {fmt(m, 'eval_reward_accuracies_before')} -> {fmt(m, 'eval_reward_accuracies')}"
        return f"{loss_line(m)}; held-out {acc}" if "eval_reward_accuracies" in m else loss_line(m)


class DPO(PreferenceStage):
    name = "dpo"
    spec = DPOSpec
    trainer_config = DPOConfig
    trainer_name = "DPOTrainer"


class KTO(PreferenceStage):
    name = "kto"
    spec = KTOSpec
    trainer_config = KTOConfig
    trainer_name = "KTOTrainer"


class ORPO(PreferenceStage):
    name = "orpo"
    spec = ORPOSpec
    trainer_config = orpo_config()  # None where this TRL lacks it: `check_args` says so
    trainer_name = "ORPOTrainer"
    with_reference = False  # ORPO has no reference model
    memory = Workload(sequences_per_example=2)

    def check_args(self, spec: Any, where: str) -> list[tuple[str, str]]:
        if self.trainer_config is None:
            return [(f"{where}.type", "the installed TRL has no ORPO trainer; use `dpo`")]
        return super().check_args(spec, where)
