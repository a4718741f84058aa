"""On-policy RL stages on TRL's trainers: `grpo` (GRPOTrainer) and `rloo` (RLOOTrainer).

config -> data -> model -> trainer -> train -> save -> metrics.

Prompts come from any dataset with a prompt part; the policy is the previous policy stage's output with a
new adapter. The reward is the last `reward` stage's model (loaded as a sequence classifier) or a Python
function named `module:function` in the recipe, imported only then (the recipe's folder is on the path);
it is called as TRL calls reward functions: `f(prompts=..., completions=..., **columns) -> list[float]`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from align import distributed
from align.data import file_hash, to_prompts
from align.errors import RecipeError
from align.recipe import reward_kind
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
from align.trl_compat import GRPOConfig, RLOOConfig, check_trainer_args, coerce_trainer_args

TRAINER_CONFIG: dict[str, type] = {"grpo": GRPOConfig, "rloo": RLOOConfig}
ADAPTER_LR = 1e-5


def check_args(stage: Any, path: str) -> list[tuple[str, str]]:
    problems = check_trainer_args(stage.train, TRAINER_CONFIG[stage.type], f"{path}.train")
    if stage.adapter.type == "qlora":
        problems.append((f"{path}.adapter.type", f"{stage.type} stages take `lora`, `dora` or `full`"))
    return problems


# ---------------------------------------------------------------- the reward: a reward stage or a function


def reward_is_function(plan: Any, stage: Any) -> bool:
    return reward_kind(plan.recipe.reward_source(stage)) == "function"


def function_file(plan: Any, stage: Any) -> Path | None:
    """Where `module:function` lives, found without importing it (the recipe's folder is searched first)."""
    mod = plan.recipe.reward_source(stage).partition(":")[0]
    with _recipe_on_path(plan):
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError):
            spec = None
    return Path(spec.origin) if spec and spec.origin and spec.origin != "built-in" else None


def load_function(plan: Any, stage: Any) -> Any:
    ref = plan.recipe.reward_source(stage)
    mod, _, name = ref.partition(":")
    with _recipe_on_path(plan):
        fn = getattr(importlib.import_module(mod), name, None)
    if not callable(fn):
        raise RecipeError(f"`{ref}`: module `{mod}` has no function `{name}`", f"stages.{stage.name}.reward")
    return fn


class _recipe_on_path:
    def __init__(self, plan: Any):
        self.dir = str(plan.recipe_path.parent)

    def __enter__(self) -> None:
        sys.path.insert(0, self.dir)

    def __exit__(self, *exc: Any) -> None:
        if self.dir in sys.path:
            sys.path.remove(self.dir)


def check_reward(plan: Any, sp: Any, where: str, *, same_tokenizer: bool) -> list[tuple[str, str]]:
    """Plan-time: the function's module exists; a reward model folder exists, is a one-score classifier and
    (where the stage needs it) uses the policy's tokenizer. Reward stages share the recipe's base tokenizer."""
    stage = sp.stage
    ref = plan.recipe.reward_source(stage)
    kind = reward_kind(ref)
    if kind == "function":
        if function_file(plan, stage) is None:
            mod = ref.partition(":")[0]
            return [(f"{where}.reward", f"module `{mod}` not found (looked in {plan.recipe_path.parent} and sys.path)")]
        return []
    if kind == "stage":
        return []
    folder = Path(ref).expanduser()
    if not (folder / "config.json").is_file():
        return [(f"{where}.reward", f"{folder} is not a model folder (no config.json)")]
    cfg = json.loads((folder / "config.json").read_text())
    if not any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or []):
        return [
            (f"{where}.reward", f"{folder} is not a sequence classifier (architectures: {cfg.get('architectures')})")
        ]
    if same_tokenizer and plan.base.path is not None and not same_vocab(folder, plan.base.path):
        return [
            (
                f"{where}.reward",
                f"the reward model's tokenizer ({folder}) differs from the policy's; the value head starts from the "
                "reward model and reads the policy's tokens, so they must share one. Train a `reward` stage instead",
            )
        ]
    return []


def same_vocab(a: Path, b: Path) -> bool:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(a).get_vocab() == AutoTokenizer.from_pretrained(b).get_vocab()


def reward_identity(plan: Any, stage: Any) -> dict[str, Any]:
    """For the fingerprint: a function's source file hash (a reward stage is an input, hashed by the pipeline)."""
    ref = plan.recipe.reward_source(stage)
    if reward_kind(ref) == "stage":
        return {"stage": ref}
    if reward_kind(ref) == "path":
        files = sorted(f for f in Path(ref).expanduser().iterdir() if f.suffix in {".json", ".safetensors"})
        return {"reward_model_files": {f.name: file_hash(f) for f in files}}  # content, not where it lies
    f = function_file(plan, stage)
    return {"function": plan.recipe.reward_source(stage), "sha256": file_hash(f) if f else None}


def load_reward_model(plan: Any, sp: Any) -> tuple[Any, Any]:
    """(classifier, its tokenizer) from the reward stage's folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.models import torch_dtype
    from align.pipeline import input_artifact

    ref = plan.recipe.reward_source(sp.stage)
    art = {"path": ref} if reward_kind(ref) == "path" else input_artifact(plan, ref)
    model = AutoModelForSequenceClassification.from_pretrained(
        art["path"], dtype=torch_dtype(plan.recipe.model.dtype), use_safetensors=True
    ).eval()
    tok = AutoTokenizer.from_pretrained(art["path"])
    return model, tok


# ---------------------------------------------------------------- stage


def check(plan: Any, sp: Any) -> list[tuple[str, str]]:
    where = f"stages[{sp.index}]({sp.stage.name})"
    _, problems = check_data(plan, sp, sp.stage.type)
    problems += check_reward(plan, sp, where, same_tokenizer=False)
    return problems + check_trl_args(
        TRAINER_CONFIG[sp.stage.type], resolved_train_args(plan, sp, Path("/nonexistent")), where
    )


def resolved_train_args(plan: Any, sp: Any, work: Path) -> dict[str, Any]:
    stage = sp.stage
    args = {
        **TRAIN_DEFAULTS,
        **device_args(plan.recipe.seed, plan.recipe.model.dtype),
        **coerce_trainer_args(stage.train, TRAINER_CONFIG[stage.type]),
        "output_dir": str(work / "checkpoints"),
    }
    if stage.adapter.type != "full" and "learning_rate" not in stage.train:
        args["learning_rate"] = ADAPTER_LR
    return args


def resolved_config(plan: Any, sp: Any) -> dict[str, Any]:
    out = {k: v for k, v in resolved_train_args(plan, sp, Path(".")).items() if k != "output_dir"}
    return {**out, "reward": reward_identity(plan, sp.stage)}


def run(plan: Any, sp: Any, out: Path) -> dict[str, Any] | None:
    from align.models import peft_config, plan_tokenizer
    from align.pipeline import input_artifact, write_common
    from align.trl_compat import trainer_class

    stage = sp.stage
    # config
    args_dict = resolved_train_args(plan, sp, sp.partial_dir)
    write_common(sp, plan, out, {"stage": stage.model_dump(mode="json", by_alias=True), "train_args": args_dict})
    args = TRAINER_CONFIG[stage.type](**args_dict)
    source = input_artifact(plan, sp.inputs[0])
    tokenizer = plan_tokenizer(plan)
    chat = bool(tokenizer.chat_template)

    # data
    train_ds, _ = load_pairs(plan, stage, lambda ds, fmt: to_prompts(ds, fmt, chat=chat))

    # reward + model
    if reward_is_function(plan, stage):
        reward_funcs, reward_tok = load_function(plan, stage), None
    else:
        reward_funcs, reward_tok = load_reward_model(plan, sp)
    model = load_policy(plan, source, sp.partial_dir)
    set_pad(model, tokenizer)
    peft_cfg = None if stage.adapter.type == "full" else peft_config(stage.adapter)

    # trainer
    guard = Guard(out / "train_log.jsonl", sp.partial_dir)
    trainer = trainer_class(stage.type)(
        model=model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=train_ds,
        processing_class=tokenizer,
        reward_processing_classes=reward_tok,
        peft_config=peft_cfg,
        callbacks=[guard],
    )
    before = trainable_snapshot(trainer.model)

    # train (every rank), then prove on every rank what rank 0 saves
    result, _ = train(trainer, sp, guard)
    trained = distributed.check_ranks_agree(trainer.model, sp.name, out)

    # save (every rank takes part; the main process writes and verifies)
    output, merged = save_policy(
        trainer.model, tokenizer, out, source, trained=trained, stage=sp.name, merge=stage.merge, trainer=trainer
    )
    if not distributed.is_main():
        return None

    # metrics: the reward curve from the log
    metrics = train_metrics(trainer, result, guard, before, trained)
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    if rewards:
        k = max(1, min(5, len(rewards) // 2))
        metrics.update(
            {
                "reward_first": sum(rewards[:k]) / k,
                "reward_last": sum(rewards[-k:]) / k,
                "kl_last": next((h["kl"] for h in reversed(trainer.state.log_history) if "kl" in h), None),
            }
        )
    write_metrics(out, metrics)
    return {"type": stage.type, "output": output, "merged": merged, "metrics": metrics}
