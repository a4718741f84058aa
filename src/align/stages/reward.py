"""Reward-model stage on TRL's RewardTrainer: a one-score sequence classifier trained on preference pairs.

config -> data -> model -> trainer -> train -> save -> metrics.

The input is the last policy stage (the SFT model, as in InstructGPT) or `from:`; an adapter input is
folded into its base first. The output is always a merged reward model in safetensors (`model/`), loaded
with `AutoModelForSequenceClassification` (recorded in stage.json), so later stages need no peft code.
Held-out metrics: pairwise accuracy and mean margin; with no held-out data named, 10% is held out.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from align import distributed
from align.data import to_preference
from align.stages._train import (
    LORA_LEARNING_RATE,
    TRAIN_DEFAULTS,
    Guard,
    check_data,
    check_trl_args,
    device_args,
    load_pairs,
    set_pad,
    train,
    train_metrics,
    trainable_snapshot,
    write_metrics,
)
from align.trl_compat import RewardConfig, check_trainer_args, coerce_trainer_args

TRAINER_CONFIG = RewardConfig
AUTO_HOLDOUT = 0.1


def check_args(stage: Any, path: str) -> list[tuple[str, str]]:
    problems = check_trainer_args(stage.train, TRAINER_CONFIG, f"{path}.train")
    if stage.adapter.type == "qlora":
        problems.append((f"{path}.adapter.type", "reward stages take `lora`, `dora` or `full`"))
    return problems


def check(plan: Any, sp: Any) -> list[tuple[str, str]]:
    where = f"stages[{sp.index}]({sp.stage.name})"
    _, problems = check_data(plan, sp, "reward")
    return problems + check_trl_args(RewardConfig, resolved_train_args(plan, sp, Path("/nonexistent")), where)


def resolved_train_args(plan: Any, sp: Any, work: Path) -> dict[str, Any]:
    stage = sp.stage
    return {
        **TRAIN_DEFAULTS,
        **device_args(plan.recipe.seed, plan.recipe.model.dtype),
        "learning_rate": LORA_LEARNING_RATE if stage.adapter.type != "full" else 1e-5,
        **coerce_trainer_args(stage.train, RewardConfig),
        "output_dir": str(work / "checkpoints"),
    }


def resolved_config(plan: Any, sp: Any) -> dict[str, Any]:
    return {k: v for k, v in resolved_train_args(plan, sp, Path(".")).items() if k != "output_dir"}


def holdout(train_ds: Any, eval_ds: Any, seed: int) -> tuple[Any, Any, str]:
    """Preference stages always report held-out metrics: named held-out data, else 10% of the pairs."""
    if eval_ds is not None:
        return train_ds, eval_ds, "eval split of the recipe"
    if len(train_ds) < 10:
        return train_ds, None, "none (fewer than 10 pairs)"
    parts = train_ds.train_test_split(test_size=AUTO_HOLDOUT, seed=seed)
    return parts["train"], parts["test"], f"auto: {AUTO_HOLDOUT:.0%} of the pairs"


def load_classifier(plan: Any, source: dict[str, Any], work: Path, tokenizer: Any) -> Any:
    """A one-label sequence classifier on the input model's backbone (its head is new, seeded)."""
    from align.stages._train import input_folder

    folder = input_folder(plan, source, work, always=True)  # the classifier loads from a folder
    model = classifier_from(plan, folder, seed=plan.recipe.seed)
    set_pad(model, tokenizer)
    return model


def classifier_from(plan: Any, folder: Path, *, seed: int) -> Any:
    from transformers import AutoModelForSequenceClassification, set_seed

    from align.models import torch_dtype

    set_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(
        folder,
        num_labels=1,
        dtype=torch_dtype(plan.recipe.model.dtype),
        use_safetensors=True,
        trust_remote_code=plan.recipe.model.trust_remote_code,
    )


def save_reward_model(
    plan: Any, sp: Any, trainer: Any, tokenizer: Any, out: Path, source: dict[str, Any], trained: dict[str, Any]
) -> None:
    """Always a merged classifier, so PPO/GRPO load it with transformers alone.

    With an adapter: the gathered adapter is written and verified, then the main process folds it into a
    fresh copy of the input classifier (never the sharded in-training one) and the merged model is checked
    against the adapter's parameter count."""
    from peft import PeftModel

    from align.stages._train import input_folder, save_policy

    if not hasattr(trainer.model, "peft_config"):
        save_policy(trainer.model, tokenizer, out, source, trained=trained, stage=sp.name, merge=False, trainer=trainer)
        return
    adapter_dir = sp.partial_dir / "reward-adapter"
    save_policy(trainer.model, tokenizer, adapter_dir, source, trained=trained, stage=sp.name, merge=False)
    folder = input_folder(plan, source, sp.partial_dir, always=True)  # every rank: it may wait at a barrier
    if distributed.is_main():
        with distributed.no_zero_init():
            base = classifier_from(plan, folder, seed=plan.recipe.seed)
            set_pad(base, tokenizer)
            merged = PeftModel.from_pretrained(base, adapter_dir / "adapter").merge_and_unload()
        merged.save_pretrained(out / "model", safe_serialization=True)
        tokenizer.save_pretrained(out / "model")
        saved = distributed.saved_tensors(out / "model")
        empty = [k for k, t in saved.items() if t.numel() == 0]
        if not saved or empty:
            from align.errors import StageFailed

            raise StageFailed(f"stage `{sp.name}`: the merged reward model in {out / 'model'} is empty or broken")
        shutil.rmtree(adapter_dir, ignore_errors=True)
        shutil.rmtree(sp.partial_dir / "input-merged", ignore_errors=True)


def run(plan: Any, sp: Any, out: Path) -> dict[str, Any] | None:
    from align.models import peft_config, plan_tokenizer
    from align.pipeline import input_artifact, write_common
    from align.trl_compat import trainer_class

    stage, recipe = sp.stage, plan.recipe
    # config
    args_dict = resolved_train_args(plan, sp, sp.partial_dir)
    write_common(sp, plan, out, {"stage": stage.model_dump(mode="json", by_alias=True), "train_args": args_dict})
    args = RewardConfig(**args_dict)
    source = input_artifact(plan, sp.inputs[0])
    tokenizer = plan_tokenizer(plan)
    chat = bool(tokenizer.chat_template)

    # data
    train_ds, eval_ds = load_pairs(plan, stage, lambda ds, fmt: to_preference(ds, fmt, chat=chat))
    train_ds, eval_ds, heldout = holdout(train_ds, eval_ds, recipe.seed)

    # model
    model = load_classifier(plan, source, sp.partial_dir, tokenizer)
    peft_cfg = None if stage.adapter.type == "full" else peft_config(stage.adapter, task_type="SEQ_CLS")

    # trainer
    guard = Guard(out / "train_log.jsonl", sp.partial_dir)
    trainer = trainer_class("reward")(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_cfg,
        callbacks=[guard],
    )
    before = trainable_snapshot(trainer.model)

    # train (the "before" evaluation runs once the model is wrapped, on every rank)
    result, ev_before = train(trainer, sp, guard, evaluate_before=eval_ds is not None)
    trained = distributed.check_ranks_agree(trainer.model, sp.name, out)

    # metrics (every rank takes part in the evaluation)
    metrics = train_metrics(trainer, result, guard, before, trained)
    metrics["heldout"] = heldout
    if eval_ds is not None:
        ev = trainer.evaluate()
        metrics.update(
            {
                "eval_pairs": len(eval_ds),
                "eval_accuracy": ev.get("eval_accuracy"),
                "eval_margin": ev.get("eval_margin"),
                "eval_loss": ev.get("eval_loss"),
                "eval_accuracy_before": ev_before.get("eval_accuracy"),
                "eval_margin_before": ev_before.get("eval_margin"),
            }
        )
    # save
    save_reward_model(plan, sp, trainer, tokenizer, out, source, trained)
    if not distributed.is_main():
        return None
    write_metrics(out, metrics)
    output = {"kind": "reward_model", "path": "model", "loader": "transformers.AutoModelForSequenceClassification"}
    return {"type": "reward", "output": output, "metrics": metrics}
