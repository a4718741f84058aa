"""Offline preference stages on TRL's trainers: `dpo` (DPOTrainer), `kto` (KTOTrainer), `orpo` (ORPOTrainer).

config -> data -> model -> trainer -> train -> save -> metrics.

The policy is the previous policy stage's output (an SFT adapter is folded into its base first), with a
new adapter on top. DPO and KTO need a reference model: with an adapter it is the same weights with the
adapter disabled (TRL does this when `ref_model` is None and the model is a PeftModel), so no second
copy is held in memory. ORPO has no reference. Loss variants go through TRL's own fields
(`train.loss_type`, `train.beta`, ...). Held-out reward accuracy and margins are measured before and
after training (before training the policy equals the reference, so every implicit reward is 0 and
TRL's strict `chosen > rejected` accuracy is 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align import distributed
from align.data import to_preference
from align.stages._train import (
    TRAIN_DEFAULTS,
    Guard,
    check_data,
    check_trl_args,
    device_args,
    load_pairs,
    load_policy,
    save_policy,
    set_pad,
    train,
    train_metrics,
    trainable_snapshot,
    write_metrics,
)
from align.stages.reward import holdout
from align.trl_compat import DPOConfig, KTOConfig, check_trainer_args, coerce_trainer_args, orpo_config

TRAINER_CONFIG: dict[str, type | None] = {"dpo": DPOConfig, "kto": KTOConfig, "orpo": orpo_config()}
ADAPTER_LR = 5e-5  # preference tuning moves less than SFT; TRL's 1e-6 suits full fine-tuning


def _config(stage_type: str) -> type:
    cls = TRAINER_CONFIG[stage_type]
    if cls is None:
        from align.errors import RecipeError

        raise RecipeError(f"the installed TRL has no {stage_type.upper()} trainer", "type")
    return cls


def check_args(stage: Any, path: str) -> list[tuple[str, str]]:
    cls = TRAINER_CONFIG[stage.type]
    if cls is None:
        return [(f"{path}.type", f"the installed TRL has no `{stage.type}` trainer; use `dpo`")]
    problems = check_trainer_args(stage.train, cls, f"{path}.train")
    if stage.adapter.type == "qlora":
        problems.append((f"{path}.adapter.type", f"{stage.type} stages take `lora`, `dora` or `full`"))
    if stage.merge and stage.adapter.type == "full":
        problems.append((f"{path}.merge", "`merge` folds an adapter into the base; with `adapter.type: full` drop it"))
    return problems


def check(plan: Any, sp: Any) -> list[tuple[str, str]]:
    where = f"stages[{sp.index}]({sp.stage.name})"
    _, problems = check_data(plan, sp, sp.stage.type)
    return problems + check_trl_args(_config(sp.stage.type), resolved_train_args(plan, sp, Path("/nonexistent")), where)


def resolved_train_args(plan: Any, sp: Any, work: Path) -> dict[str, Any]:
    stage = sp.stage
    cls = _config(stage.type)
    args = {
        **TRAIN_DEFAULTS,
        **device_args(plan.recipe.seed, plan.recipe.model.dtype),
        **coerce_trainer_args(stage.train, cls),
        "output_dir": str(work / "checkpoints"),
    }
    if stage.adapter.type != "full" and "learning_rate" not in stage.train:
        args["learning_rate"] = ADAPTER_LR
    return args


def resolved_config(plan: Any, sp: Any) -> dict[str, Any]:
    return {k: v for k, v in resolved_train_args(plan, sp, Path(".")).items() if k != "output_dir"}


def run(plan: Any, sp: Any, out: Path) -> dict[str, Any] | None:
    from align.models import peft_config, plan_tokenizer
    from align.pipeline import input_artifact, write_common
    from align.trl_compat import trainer_class

    stage, recipe = sp.stage, plan.recipe
    # config
    args_dict = resolved_train_args(plan, sp, sp.partial_dir)
    write_common(sp, plan, out, {"stage": stage.model_dump(mode="json", by_alias=True), "train_args": args_dict})
    args = _config(stage.type)(**args_dict)
    source = input_artifact(plan, sp.inputs[0])
    tokenizer = plan_tokenizer(plan)
    chat = bool(tokenizer.chat_template)

    # data
    train_ds, eval_ds = load_pairs(plan, stage, lambda ds, fmt: to_preference(ds, fmt, chat=chat))
    train_ds, eval_ds, heldout = holdout(train_ds, eval_ds, recipe.seed)

    # model: the policy; the reference is the same weights with the adapter disabled
    model = load_policy(plan, source, sp.partial_dir)
    set_pad(model, tokenizer)
    peft_cfg = None if stage.adapter.type == "full" else peft_config(stage.adapter)

    # trainer
    guard = Guard(out / "train_log.jsonl", sp.partial_dir)
    kw: dict[str, Any] = {} if stage.type == "orpo" else {"ref_model": None}
    trainer = trainer_class(stage.type)(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_cfg,
        callbacks=[guard],
        **kw,
    )
    before = trainable_snapshot(trainer.model)

    # train (the "before" evaluation runs once the model is wrapped, on every rank)
    result, ev_before = train(trainer, sp, guard, evaluate_before=eval_ds is not None)
    trained = distributed.check_ranks_agree(trainer.model, sp.name, out)

    # save (every rank takes part; the main process writes and verifies)
    output, merged = save_policy(
        trainer.model, tokenizer, out, source, trained=trained, stage=sp.name, merge=stage.merge, trainer=trainer
    )

    # metrics (every rank takes part in the evaluation)
    metrics = train_metrics(trainer, result, guard, before, trained)
    metrics["heldout"] = heldout
    if eval_ds is not None:
        ev = trainer.evaluate()
        metrics["eval_pairs"] = len(eval_ds)
        for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen"):
            if key in ev:
                name = key.replace("eval_rewards/", "eval_reward_")
                metrics[name] = ev[key]
                metrics[f"{name}_before"] = ev_before.get(key)
    if not distributed.is_main():
        return None
    write_metrics(out, metrics)
    return {"type": stage.type, "output": output, "merged": merged, "metrics": metrics}
