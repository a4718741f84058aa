"""SFT stage on TRL's SFTTrainer: full fine-tuning, LoRA, DoRA, QLoRA.

config -> data -> model -> trainer -> train -> save -> metrics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from align import distributed
from align.data import to_sft
from align.errors import RecipeError
from align.stages._train import (
    LORA_LEARNING_RATE,
    TRAIN_DEFAULTS,
    Guard,
    check_data,
    check_trl_args,
    device_args,
    load_pairs,
    load_policy,
    names,
    save_policy,
    set_pad,
    train,
    train_metrics,
    trainable_snapshot,
    write_metrics,
)
from align.trl_compat import SFTConfig, check_trainer_args, coerce_trainer_args

SFT_DEFAULTS: dict[str, Any] = {
    **TRAIN_DEFAULTS,
    "packing": True,  # best-fit-decreasing packing, padding-free: no compute spent on pad tokens
    "include_num_input_tokens_seen": "non_padding",
}
TRAINER_CONFIG = SFTConfig  # what `train:` is checked against


# ---------------------------------------------------------------- checks


def check_args(stage: Any, path: str) -> list[tuple[str, str]]:
    problems = check_trainer_args(stage.train, TRAINER_CONFIG, f"{path}.train")
    for key, use in (("completion_only_loss", "loss_on"), ("assistant_only_loss", "loss_on")):
        if key in stage.train:
            problems.append((f"{path}.train.{key}", f"set `{use}: completion` or `{use}: all` on the stage instead"))
    if stage.merge and stage.adapter.type == "full":
        problems.append((f"{path}.merge", "`merge` folds an adapter into the base; with `adapter.type: full` drop it"))
    if stage.adapter.type == "full" and "adapter" in stage.model_fields_set:
        extra = {"r", "alpha", "dropout", "target_modules"} & stage.adapter.model_fields_set
        if extra:
            problems.append((f"{path}.adapter", f"{sorted(extra)} have no effect with `type: full`; remove them"))
    return problems


def check(plan: Any, sp: Any) -> list[tuple[str, str]]:
    """Plan-time: data files and columns, chat template, QLoRA hardware, TRL's own argument checks."""
    stage, recipe = sp.stage, plan.recipe
    where = f"stages[{sp.index}]({stage.name})"
    formats, problems = check_data(plan, sp, "sft")
    chat_needed = [n for n, f in formats.items() if f == "messages"]
    if chat_needed and not has_chat_template(plan) and not recipe.model.chat_template:
        problems.append(
            (
                f"{where}.data",
                f"{chat_needed} hold chat `messages` but the tokenizer has no chat template; "
                "set `model.chat_template: path/to/template.jinja`",
            )
        )
    if stage.adapter.type == "qlora":
        from align.quantization import qlora_unavailable_reason

        reason = qlora_unavailable_reason()
        if reason:
            problems.append((f"{where}.adapter.type", f"qlora cannot run here: {reason}; use `lora` instead"))
    return problems + check_trl_args(SFTConfig, resolved_train_args(plan, sp, Path("/nonexistent")), where)


def has_chat_template(plan: Any) -> bool:
    """Cheap: look at the tokenizer files instead of loading the tokenizer."""
    base = plan.base
    if base.kind == "embedded":
        return True
    if base.path is None:
        return True  # a hub model not yet downloaded: checked when it loads
    if (base.path / "chat_template.jinja").is_file():
        return True
    cfg = base.path / "tokenizer_config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text()).get("chat_template"))


# ---------------------------------------------------------------- config


def resolved_train_args(plan: Any, sp: Any, work: Path) -> dict[str, Any]:
    stage = sp.stage
    args = {
        **SFT_DEFAULTS,
        **device_args(plan.recipe.seed, plan.recipe.model.dtype),
        "learning_rate": LORA_LEARNING_RATE if stage.adapter.type != "full" else 2e-5,
        **coerce_trainer_args(stage.train, SFTConfig),
        "output_dir": str(work / "checkpoints"),
        "completion_only_loss": stage.loss_on == "completion",
    }
    if args.get("eval_strategy", "no") != "no" and stage.eval_data is None and not _has_eval_split(plan, stage):
        args["eval_strategy"] = "no"  # nothing to evaluate on; checked in check()
    return args


def resolved_config(plan: Any, sp: Any) -> dict[str, Any]:
    """What the fingerprint records beyond the recipe: the trainer arguments after align's defaults."""
    return {k: v for k, v in resolved_train_args(plan, sp, Path(".")).items() if k != "output_dir"}


def _has_eval_split(plan: Any, stage: Any) -> bool:
    return any(plan.recipe.datasets[n].eval_fraction or plan.recipe.datasets[n].eval_path for n in names(stage.data))


# ---------------------------------------------------------------- run


def run(plan: Any, sp: Any, out: Path) -> dict[str, Any] | None:
    import torch

    from align.models import peft_config, plan_tokenizer, torch_dtype
    from align.pipeline import input_artifact, write_common
    from align.trl_compat import SFTTrainer

    stage, recipe = sp.stage, plan.recipe
    # config
    args_dict = resolved_train_args(plan, sp, sp.partial_dir)
    write_common(sp, plan, out, {"stage": stage.model_dump(mode="json", by_alias=True), "train_args": args_dict})
    args = SFTConfig(**args_dict)
    source = input_artifact(plan, sp.inputs[0])
    tokenizer = plan_tokenizer(plan)
    chat = bool(tokenizer.chat_template)

    # data
    train_ds, eval_ds = load_pairs(
        plan, stage, lambda ds, fmt: to_sft(ds, fmt, chat=chat, loss_on=stage.loss_on, eos=tokenizer.eos_token)
    )

    # model
    kw: dict[str, Any] = {}
    if stage.adapter.type == "qlora":
        kw["quantization_config"] = _qlora_config(plan, stage)
    model = load_policy(plan, source, sp.partial_dir, **kw)
    if kw and not torch.cuda.is_available():
        from align.quantization import keep_4bit_train_layout

        keep_4bit_train_layout(model)  # else an eval forward repacks weights into a layout with no backward
    if model.generation_config is not None and tokenizer.pad_token_id is not None:
        set_pad(model, tokenizer)
    peft_cfg = None if stage.adapter.type == "full" else peft_config(stage.adapter)

    # trainer
    guard = Guard(out / "train_log.jsonl", sp.partial_dir)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
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

    # metrics (held-out evaluation is a collective: every rank)
    metrics = train_metrics(trainer, result, guard, before, trained)
    metrics["tokens_seen"] = int(trainer.state.num_input_tokens_seen or 0)
    metrics["dtype"] = str(torch_dtype(recipe.model.dtype)).replace("torch.", "")
    if metrics["train_runtime_s"]:
        metrics["tokens_per_s"] = metrics["tokens_seen"] / metrics["train_runtime_s"]
    if eval_ds is not None:
        ev = trainer.evaluate()
        metrics["eval_loss"] = ev["eval_loss"]
        metrics["eval_perplexity"] = math.exp(min(ev["eval_loss"], 50))
    if not distributed.is_main():
        return None
    write_metrics(out, metrics)
    return {"type": "sft", "output": output, "merged": merged, "metrics": metrics}


def _qlora_config(plan: Any, stage: Any) -> Any:
    """4-bit base weights; on CPU only after the gradient check agrees (bitsandbytes has no CPU autograd kernel)."""
    import torch

    from align.quantization import bnb_4bit_config, check_qlora_gradients

    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if not torch.cuda.is_available():
        res = check_qlora_gradients(str(plan.base.path), stage.adapter.target_modules, keep_train_layout=True)
        print(f"[align] QLoRA gradient check on CPU: max relative error {res.max_rel_err:.2e} ({res.detail})")
        if not res.ok and not stage.allow_cpu_qlora:
            raise RecipeError(
                f"QLoRA gradients on this CPU disagree with the dequantized reference (max relative error "
                f"{res.max_rel_err:.2e}); use `adapter.type: lora`, or set `allow_cpu_qlora: true` to train anyway",
                f"stages.{stage.name}.adapter.type",
            )
    return bnb_4bit_config(compute)
