"""SFT stage on TRL's SFTTrainer: full fine-tuning, LoRA, DoRA, QLoRA.

config -> data -> model -> trainer -> train -> save -> metrics.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from align.data import check_format, data_files, is_local, mix, peek_rows, to_sft, train_eval_split
from align.errors import NonFiniteLoss, RecipeError
from align.trl_compat import SFTConfig, check_trainer_args, coerce_trainer_args

# align's defaults where TRL's do not suit a pipeline (everything else is TRL's own default).
# They are recorded in each stage's config.yaml; a recipe's `train:` overrides any of them.
SFT_DEFAULTS: dict[str, Any] = {
    "report_to": "none",
    "logging_steps": 1,  # the NaN guard and train_log.jsonl see every step
    "logging_nan_inf_filter": False,  # transformers would hide a NaN loss from the log (and our guard)
    "save_strategy": "steps",
    "save_steps": 20,  # frequent, cheap adapter checkpoints make kill-and-resume lose little
    "save_total_limit": 2,
    "activation_checkpointing": False,  # recompute costs ~30% speed; turn on for models that do not fit
    "packing": True,  # best-fit-decreasing packing, padding-free: no compute spent on pad tokens
    "include_num_input_tokens_seen": "non_padding",
    "dataloader_num_workers": 0,
}
TRAINER_CONFIG = SFTConfig  # what `train:` is checked against
LORA_LEARNING_RATE = 2e-4  # TRL's 2e-5 suits full fine-tuning; adapters want ~10x more


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
    problems: list[tuple[str, str]] = []
    formats = {}
    for name in _names(stage.data) + ([stage.eval_data] if stage.eval_data else []):
        spec = recipe.datasets[name]
        if not is_local(spec.path):
            plan.warnings.append(f"dataset `{name}`: hub id `{spec.path}` is checked when the stage loads it")
            continue
        try:
            rows = peek_rows(spec.path)
            if spec.eval_path:
                data_files(spec.eval_path)
        except RecipeError as e:
            problems += [(f"datasets.{name}.{p}", m) for p, m in e.problems]
            continue
        formats[name], found = check_format(rows, spec, "sft", f"datasets.{name}")
        problems += found
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
    try:
        SFTConfig(**resolved_train_args(plan, sp, Path("/nonexistent")))
    except (ValueError, TypeError) as e:
        problems.append((f"{where}.train", f"rejected by TRL: {str(e).splitlines()[0]}"))
    return problems


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


def _names(data: str | list[str] | dict[str, float]) -> list[str]:
    return [data] if isinstance(data, str) else list(data)


# ---------------------------------------------------------------- config


def resolved_train_args(plan: Any, sp: Any, work: Path) -> dict[str, Any]:
    import torch

    stage = sp.stage
    cuda = torch.cuda.is_available()
    args = {
        **SFT_DEFAULTS,
        "seed": plan.recipe.seed,
        "use_cpu": not cuda,
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
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
    return any(plan.recipe.datasets[n].eval_fraction or plan.recipe.datasets[n].eval_path for n in _names(stage.data))


# ---------------------------------------------------------------- run


def run(plan: Any, sp: Any, out: Path) -> dict[str, Any] | None:
    import torch

    from align.models import load_causal_lm, load_for_inference, load_tokenizer, peft_config, torch_dtype
    from align.pipeline import input_artifact, latest_checkpoint, write_common
    from align.trl_compat import SFTTrainer

    stage, recipe = sp.stage, plan.recipe
    # config
    args_dict = resolved_train_args(plan, sp, sp.partial_dir)
    write_common(sp, plan, out, {"stage": stage.model_dump(mode="json", by_alias=True), "train_args": args_dict})
    args = SFTConfig(**args_dict)
    source = input_artifact(plan, sp.inputs[0])
    tokenizer = load_tokenizer(
        Path(plan.base.path), trust_remote_code=recipe.model.trust_remote_code, chat_template=recipe.model.chat_template
    )
    chat = bool(tokenizer.chat_template)

    # data
    train_parts, evals = [], []
    weights = stage.data if isinstance(stage.data, dict) else dict.fromkeys(_names(stage.data), 1.0)
    for name, weight in weights.items():
        spec = recipe.datasets[name]
        fmt, _ = check_format(peek_rows(spec.path) if is_local(spec.path) else [{}], spec, "sft", name)
        train, held = train_eval_split(spec, recipe.seed)
        train_parts.append((to_sft(train, fmt, chat=chat, loss_on=stage.loss_on, eos=tokenizer.eos_token), weight))
        if held is not None:
            evals.append(to_sft(held, fmt, chat=chat, loss_on=stage.loss_on, eos=tokenizer.eos_token))
    if stage.eval_data:
        spec = recipe.datasets[stage.eval_data]
        fmt, _ = check_format(peek_rows(spec.path), spec, "sft", stage.eval_data)
        evals.append(
            to_sft(
                train_eval_split(spec, recipe.seed)[0], fmt, chat=chat, loss_on=stage.loss_on, eos=tokenizer.eos_token
            )
        )
    train_ds = mix(train_parts, recipe.seed)
    eval_ds = mix([(e, 1.0) for e in evals], recipe.seed) if evals else None

    # model
    dtype = recipe.model.dtype
    kw: dict[str, Any] = {"trust_remote_code": recipe.model.trust_remote_code}
    if stage.adapter.type == "qlora":
        kw["quantization_config"] = _qlora_config(plan, stage)
    if source["kind"] == "model":
        model = load_causal_lm(Path(source["path"]), dtype=dtype, **kw)
        if "quantization_config" in kw and not torch.cuda.is_available():
            from align.quantization import keep_4bit_train_layout

            keep_4bit_train_layout(model)  # else an eval forward repacks weights into a layout with no backward
    else:  # an earlier stage's adapter: fold it into its base, then adapt again
        model = load_for_inference(source, dtype=dtype).merge_and_unload()
    if model.generation_config is not None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    peft_cfg = None if stage.adapter.type == "full" else peft_config(stage.adapter)

    # trainer
    guard = _Guard(out / "train_log.jsonl", sp.partial_dir)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_cfg,
        callbacks=[guard],
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    # train
    resume = latest_checkpoint(sp)
    if resume is not None:
        print(f"[align] {stage.name}: resuming from {resume.name}", flush=True)
    with guard.trap_sigint():
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if guard.interrupted:
        trainer.accelerator.wait_for_everyone()
        raise KeyboardInterrupt
    if not trainer.is_world_process_zero():
        return None

    # save
    final_model = trainer.model
    if peft_cfg is not None:
        final_model.save_pretrained(out / "adapter", safe_serialization=True)
        tokenizer.save_pretrained(out / "adapter")
        output = {"kind": "adapter", "path": "adapter", "base": _base_of(source)}
    else:
        trainer.save_model(str(out / "model"))
        tokenizer.save_pretrained(out / "model")
        output = {"kind": "model", "path": "model"}
    merged = None
    if stage.merge:
        merged = "merged"
        m = load_for_inference({**output, "path": str(out / output["path"])}, dtype=dtype).merge_and_unload()
        m.save_pretrained(out / merged, safe_serialization=True)
        tokenizer.save_pretrained(out / merged)

    # metrics
    changed = sum(int(not torch.equal(before[n], p.detach())) for n, p in final_model.named_parameters() if n in before)
    metrics = {
        "train_loss": result.training_loss,
        "first_loss": guard.first_loss,
        "last_loss": guard.last_loss,
        "steps": trainer.state.global_step,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "tokens_seen": int(trainer.state.num_input_tokens_seen or 0),
        "trainable_params": sum(p.numel() for p in final_model.parameters() if p.requires_grad),
        "trainable_tensors_changed": changed,
        "resumed_from": resume.name if resume else None,
        "dtype": str(torch_dtype(dtype)).replace("torch.", ""),
    }
    if metrics["train_runtime_s"]:
        metrics["tokens_per_s"] = metrics["tokens_seen"] / metrics["train_runtime_s"]
    if eval_ds is not None:
        ev = trainer.evaluate()
        metrics["eval_loss"] = ev["eval_loss"]
        metrics["eval_perplexity"] = math.exp(min(ev["eval_loss"], 50))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {"type": "sft", "output": output, "merged": merged, "metrics": metrics}


def _base_of(source: dict[str, Any]) -> Any:
    """The base an adapter applies to: a folder path, or (sft after sft) the earlier adapter to fold in first."""
    return source["path"] if source["kind"] == "model" else {k: v for k, v in source.items() if k != "label"}


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


class _Guard(TrainerCallback):
    """JSONL log, NaN/inf stop, Ctrl-C -> checkpoint and stop, stop if the orchestrator died."""

    def __init__(self, log_path: Path, work: Path):
        self.log_path, self.work = log_path, work
        self.interrupted = False
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.parent = int(os.environ.get("ALIGN_PARENT_PID", "0"))

    def trap_sigint(self) -> Any:
        import contextlib

        @contextlib.contextmanager
        def ctx() -> Any:
            old = signal.signal(signal.SIGINT, self._on_sigint)
            try:
                yield
            finally:
                signal.signal(signal.SIGINT, old)

        return ctx()

    def _on_sigint(self, *_: Any) -> None:
        self.interrupted = True

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        logs = logs or {}
        bad = [k for k in ("loss", "grad_norm") if k in logs and not math.isfinite(float(logs[k]))]
        if bad:  # raised before this step's checkpoint is saved, so every kept checkpoint is good
            kept = sorted((self.work / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            raise NonFiniteLoss(
                f"{' and '.join(bad)} became {logs[bad[0]]} at step {state.global_step}; stopped. The last good "
                f"checkpoint ({kept[-1].name if kept else 'none yet'}) is kept in {self.work}. "
                "Lower `train.learning_rate` or check the data"
            )
        if "loss" in logs:
            self.first_loss = float(logs["loss"]) if self.first_loss is None else self.first_loss
            self.last_loss = float(logs["loss"])
        if state.is_world_process_zero:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a") as fh:
                fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True
        elif self.parent and not _alive(self.parent):
            # The orchestrator was killed: stop without finalizing; a re-run resumes from the last checkpoint.
            os._exit(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
