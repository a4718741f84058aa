"""What every training stage shares: trainer defaults, the input model, the guard callback, resume, saving.

The stage modules (sft, reward, preference, online, ppo) read top to bottom as
config -> data -> model -> trainer -> train -> save -> metrics and call into here for the common parts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from align.data import check_format, data_files, is_local, mix, peek_rows, train_eval_split
from align.errors import NonFiniteLoss, RecipeError

# align's defaults where TRL's do not suit a pipeline (everything else is TRL's own default).
# They are recorded in each stage's config.yaml; a recipe's `train:` overrides any of them.
TRAIN_DEFAULTS: dict[str, Any] = {
    "report_to": "none",
    "logging_steps": 1,  # the NaN guard and train_log.jsonl see every step
    "logging_nan_inf_filter": False,  # transformers would hide a NaN loss from the log (and our guard)
    "save_strategy": "steps",
    "save_steps": 20,  # frequent, cheap adapter checkpoints make kill-and-resume lose little
    "save_total_limit": 2,
    "activation_checkpointing": False,  # recompute costs ~30% speed; turn on for models that do not fit
    "dataloader_num_workers": 0,
}
LORA_LEARNING_RATE = 2e-4  # TRL's defaults suit full fine-tuning; adapters want ~10x more


def device_args(seed: int) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {"seed": seed, "use_cpu": not cuda, "bf16": bool(cuda and torch.cuda.is_bf16_supported())}


def names(data: str | list[str] | dict[str, float]) -> list[str]:
    return [data] if isinstance(data, str) else list(data)


# ---------------------------------------------------------------- plan-time checks


def check_data(plan: Any, sp: Any, stage_type: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Formats of a stage's local datasets (first rows only) and every problem found."""
    stage, recipe = sp.stage, plan.recipe
    problems: list[tuple[str, str]] = []
    formats: dict[str, str] = {}
    for name in names(stage.data) + ([stage.eval_data] if getattr(stage, "eval_data", None) else []):
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
        formats[name], found = check_format(rows, spec, stage_type, f"datasets.{name}")
        problems += [(p, f"{m} (used by stage `{stage.name}`)") for p, m in found]
    return formats, problems


def check_trl_args(config_cls: type, args: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """TRL's own __post_init__ checks (illegal combinations), run at plan time."""
    try:
        config_cls(**args)
    except (ValueError, TypeError) as e:
        return [(f"{where}.train", f"rejected by TRL: {str(e).splitlines()[0]}")]
    return []


# ---------------------------------------------------------------- data


def load_pairs(plan: Any, stage: Any, convert: Any) -> tuple[Any, Any | None]:
    """(train, held-out) datasets of a stage, each row passed through `convert(ds, fmt)`; mixtures by weight."""
    recipe = plan.recipe
    parts, evals = [], []
    weights = stage.data if isinstance(stage.data, dict) else dict.fromkeys(names(stage.data), 1.0)
    for name, weight in weights.items():
        spec = recipe.datasets[name]
        fmt, _ = check_format(peek_rows(spec.path) if is_local(spec.path) else [{}], spec, stage.type, name)
        train, held = train_eval_split(spec, recipe.seed)
        parts.append((convert(train, fmt), weight))
        if held is not None:
            evals.append(convert(held, fmt))
    if getattr(stage, "eval_data", None):
        spec = recipe.datasets[stage.eval_data]
        fmt, _ = check_format(peek_rows(spec.path), spec, stage.type, stage.eval_data)
        evals.append(convert(train_eval_split(spec, recipe.seed)[0], fmt))
    train_ds = mix(parts, recipe.seed)
    return train_ds, (mix([(e, 1.0) for e in evals], recipe.seed) if evals else None)


# ---------------------------------------------------------------- model


def load_policy(plan: Any, source: dict[str, Any], **kw: Any) -> Any:
    """The causal LM a stage starts from: the base folder, or an earlier stage's adapter folded into its base."""
    from align.models import load_causal_lm, load_for_inference

    dtype = plan.recipe.model.dtype
    if source["kind"] == "model":
        return load_causal_lm(
            Path(source["path"]), dtype=dtype, trust_remote_code=plan.recipe.model.trust_remote_code, **kw
        )
    if kw:
        raise RecipeError("4-bit loading needs a full model as input, not an adapter", "adapter.type")
    return load_for_inference(source, dtype=dtype).merge_and_unload()


def base_of(source: dict[str, Any]) -> Any:
    """What an adapter applies to: a folder path, or the earlier adapter (on its own base) to fold in first."""
    return source["path"] if source["kind"] == "model" else {k: v for k, v in source.items() if k != "label"}


def set_pad(model: Any, tokenizer: Any) -> None:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def trainable_snapshot(model: Any) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def changed_count(model: Any, before: dict[str, Any]) -> int:
    import torch

    return sum(int(not torch.equal(before[n], p.detach())) for n, p in model.named_parameters() if n in before)


# ---------------------------------------------------------------- train


def train(trainer: Any, sp: Any, guard: Guard) -> Any:
    """Resume from the newest complete checkpoint of this exact configuration; Ctrl-C saves and stops."""
    from align.pipeline import latest_checkpoint

    resume = latest_checkpoint(sp)
    if resume is not None:
        print(f"[align] {sp.name}: resuming from {resume.name}", flush=True)
    guard.resumed_from = resume.name if resume else None
    with guard.trap_sigint():
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if guard.interrupted:
        trainer.accelerator.wait_for_everyone()
        raise KeyboardInterrupt
    return result


def save_policy(
    trainer: Any, tokenizer: Any, out: Path, source: dict[str, Any], *, adapter: bool, merge: bool
) -> tuple[dict[str, Any], str | None]:
    """Adapter (or full model) in safetensors with the tokenizer; optionally a merged copy."""
    from align.models import load_for_inference

    if adapter:
        trainer.model.save_pretrained(out / "adapter", safe_serialization=True)
        tokenizer.save_pretrained(out / "adapter")
        output = {"kind": "adapter", "path": "adapter", "base": base_of(source)}
    else:
        trainer.save_model(str(out / "model"))
        tokenizer.save_pretrained(out / "model")
        output = {"kind": "model", "path": "model"}
    merged = None
    if merge and adapter:
        merged = "merged"
        m = load_for_inference({**output, "path": str(out / output["path"])}).merge_and_unload()
        m.save_pretrained(out / merged, safe_serialization=True)
        tokenizer.save_pretrained(out / merged)
    return output, merged


def train_metrics(trainer: Any, result: Any, guard: Guard, before: dict[str, Any]) -> dict[str, Any]:
    model = trainer.model
    m = {
        "train_loss": result.training_loss,
        "first_loss": guard.first_loss,
        "last_loss": guard.last_loss,
        "steps": trainer.state.global_step,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "trainable_tensors_changed": changed_count(model, before),
        "resumed_from": guard.resumed_from,
    }
    return m


def write_metrics(out: Path, metrics: dict[str, Any]) -> None:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


class Guard(TrainerCallback):
    """JSONL log, NaN/inf stop, Ctrl-C -> checkpoint and stop, stop if the orchestrator died."""

    def __init__(self, log_path: Path, work: Path):
        self.log_path, self.work = log_path, work
        self.interrupted = False
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.resumed_from: str | None = None
        self.parent = int(os.environ.get("ALIGN_PARENT_PID", "0"))

    def trap_sigint(self) -> Any:
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

    def should_stop(self) -> bool:
        """For loops that are not a transformers Trainer (ppo): interrupted, or the orchestrator died."""
        if self.parent and not alive(self.parent):
            os._exit(1)
        return self.interrupted

    def check(self, logs: dict[str, Any], step: int) -> None:
        bad = [
            k
            for k in ("loss", "grad_norm", "policy_loss", "value_loss")
            if k in logs and not math.isfinite(float(logs[k]))
        ]
        if bad:  # raised before this step's checkpoint is saved, so every kept checkpoint is good
            kept = sorted((self.work / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            raise NonFiniteLoss(
                f"{' and '.join(bad)} became {logs[bad[0]]} at step {step}; stopped. The last good "
                f"checkpoint ({kept[-1].name if kept else 'none yet'}) is kept in {self.work}. "
                "Lower `train.learning_rate` or check the data"
            )
        loss = logs.get("loss", logs.get("policy_loss"))
        if loss is not None:
            self.first_loss = float(loss) if self.first_loss is None else self.first_loss
            self.last_loss = float(loss)

    def log(self, record: dict[str, Any]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        logs = logs or {}
        self.check(logs, state.global_step)
        if state.is_world_process_zero:
            self.log({"step": state.global_step, **logs})

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True
        elif self.parent and not alive(self.parent):
            # The orchestrator was killed: stop without finalizing; a re-run resumes from the last checkpoint.
            os._exit(1)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
