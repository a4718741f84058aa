"""What every training stage shares: device flags, data checks and loading, the input model, the guard
callback, resume, saving and metrics. The TRL stages' skeleton (`align.stages._trl`) and PPO call into here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import signal
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from align import distributed
from align.console import orchestrated
from align.data import check_format, is_local, mix, peek_rows, scan_dataset, train_eval_split
from align.errors import NonFiniteLoss, RecipeError, StageFailed, did_you_mean
from align.models import module_names
from align.rundir import Plan, StagePlan, latest_checkpoint

Problem = tuple[str, str]


def device_args(seed: int, dtype: str = "auto") -> dict[str, Any]:
    """Device and precision flags; the launcher passes the same precision (align.launch.mixed_precision)."""
    import torch

    from align.launch import mixed_precision

    mp = mixed_precision(dtype)
    out = {"seed": seed, "use_cpu": not torch.cuda.is_available(), "bf16": mp == "bf16"}
    if mp == "fp16":
        out["fp16"] = True
    return out


def names(data: str | list[str] | dict[str, float]) -> list[str]:
    return [data] if isinstance(data, str) else list(data)


# ---------------------------------------------------------------- plan-time checks


def check_data(plan: Plan, sp: StagePlan, formats: tuple[str, ...]) -> tuple[dict[str, str], list[Problem]]:
    """Formats of a stage's local datasets and every problem found. Every file is read in full, as the stage
    will read it (`align.data.scan_dataset`, cached by content); the LoRA rank is checked against the model."""
    stage, recipe = sp.stage, plan.recipe
    problems: list[Problem] = []
    found_formats: dict[str, str] = {}
    need_assistant = getattr(stage, "loss_on", None) == "completion"  # sft trains on the last assistant turn
    for name in names(stage.data) + ([stage.eval_data] if getattr(stage, "eval_data", None) else []):
        spec = recipe.datasets[name]
        if not is_local(spec.path):
            plan.warnings.append(f"dataset `{name}`: hub id `{spec.path}` is checked when the stage loads it")
            continue
        for key in ("split", "subset"):  # hub datasets' settings: a local file is read whole, as one split
            if key in spec.model_fields_set and getattr(spec, key) not in (None, "train"):
                problems.append(
                    (
                        f"datasets.{name}.{key}",
                        f"`{key}` picks part of a hub dataset; the local `{spec.path}` is read whole (remove it; "
                        "for held-out rows use `eval_path` or `eval_fraction`)",
                    )
                )
        for which in ("path", "eval_path") if spec.eval_path else ("path",):
            scan = scan_dataset(spec, formats, who=stage.type, which=which, need_assistant=need_assistant)
            where = f"datasets.{name}" + ("" if which == "path" else ".eval_path")
            problems += [
                (f"datasets.{name}.{p}" if p else where, f"{m} (used by stage `{stage.name}`)")
                for p, m in scan.problems
            ]
            notes = [f"dataset `{name}`{'' if which == 'path' else ' (eval_path)'}: {w}" for w in scan.warnings]
            plan.warnings += [w for w in notes if w not in plan.warnings]
            if which == "path":
                found_formats[name] = scan.format
                rows = min(scan.rows, spec.max_samples or scan.rows)
                if spec.eval_fraction and rows and not scan.problems and math.ceil(spec.eval_fraction * rows) >= rows:
                    problems.append(
                        (
                            f"datasets.{name}.eval_fraction",
                            f"{spec.eval_fraction} of {rows} rows holds out every row, leaving none to train on; "
                            "use a smaller share (0.1 is usual) or a separate `eval_path`",
                        )
                    )
            elif not scan.problems and scan.format != found_formats.get(name, scan.format):
                problems.append(
                    (where, f"holds `{scan.format}` rows but `path` holds `{found_formats[name]}`; use one format")
                )
    adapter = getattr(stage, "adapter", None)
    width = _model_width(plan.base) if adapter is not None and adapter.type != "full" else None
    if width is not None and adapter.r > width:
        problems.append(
            (
                f"{sp.where}.adapter.r",
                f"rank {adapter.r} is larger than the model's hidden size ({width}); a LoRA rank is at most that "
                "(8 to 64 is usual)",
            )
        )
    if adapter is not None and adapter.type != "full" and isinstance(adapter.target_modules, list):
        problems += _target_problems(plan, adapter.target_modules, f"{sp.where}.adapter.target_modules")
    return found_formats, problems


def _target_problems(plan: Plan, targets: list[str], where: str) -> list[Problem]:
    """`target_modules` names modules of the model (peft matches a name or its last parts); checked against the
    weights' names in the safetensors headers, where the model is on disk."""
    if not targets:
        return [(where, "is empty: name the layers to adapt (e.g. [q_proj, v_proj]) or write `all-linear`")]
    names = module_names(plan.base.path) if plan.base.path is not None else None
    if not names:
        return []
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    out = []
    for t in targets:
        if not any(n == t or n.endswith(f".{t}") for n in names):
            out.append(
                (where, f"no module `{t}` in the model{did_you_mean(t, leaves)}; its layers: {', '.join(leaves)}")
            )
    return out


def _model_width(base: Any) -> int | None:
    """The model's hidden size from its config.json: the local folder, the embedded GGUF header, or for a
    hub model not downloaded yet the hub cache or the hub (config.json only, a quick connect first);
    None when none is readable (then the stage's load is the check)."""
    try:
        cfg, _ = _config_cached(str(base.path) if base.path else None, base.kind, str(base.ref))
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict):
        return None
    for c in (cfg, cfg.get("text_config") or {}):
        for key in ("hidden_size", "n_embd", "d_model"):
            if isinstance(c, dict) and isinstance(c.get(key), int):
                return c[key]
    return None


@functools.lru_cache(maxsize=32)
def _config_cached(path: str | None, kind: str, ref: str) -> tuple[Any, str]:
    from align.memory import read_model_config

    return read_model_config(Path(path) if path else None, kind=kind, ref=ref)


def has_chat_template(plan: Plan) -> bool:
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


def chat_rows(spec: Any) -> bool:
    """The dataset's first rows hold chat messages (lists of {role, content}), which need a chat template."""
    if not is_local(spec.path):
        return False
    try:
        rows = peek_rows(spec.path)
    except RecipeError:
        return False  # unreadable: the full check says so
    return any(
        isinstance(v, list) and v and isinstance(v[0], dict) and "role" in v[0]
        for r in rows
        if isinstance(r, dict)
        for v in r.values()
    )


def check_chat_template(plan: Plan, sp: StagePlan, datasets: list[str]) -> list[Problem]:
    """Chat-message data needs a chat template to become token ids; without one the stage would fail mid-run."""
    if plan.recipe.model.chat_template or has_chat_template(plan):
        return []
    need = [n for n in dict.fromkeys(datasets) if chat_rows(plan.recipe.datasets[n])]
    if not need:
        return []
    return [
        (
            f"{sp.where}.data",
            f"{need} hold chat messages but the tokenizer of `{plan.base.ref}` has no chat template; set "
            "`model.chat_template: path/to/template.jinja`, or use plain-text rows",
        )
    ]


def check_trl_args(config_cls: type, args: dict[str, Any], where: str) -> list[Problem]:
    """TRL's own __post_init__ checks (illegal combinations), run at plan time."""
    try:
        config_cls(**args)
    except Exception as e:  # noqa: BLE001 - a config's own checks raise what they like (ZeroDivisionError too)
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        named = [k for k in args if re.search(rf"\b{re.escape(k)}\b", text)]  # the field its message names
        field = f"{where}.train.{named[0]}" if len(named) == 1 else f"{where}.train"
        return [(field, f"rejected by TRL: {text}")]
    return []


# ---------------------------------------------------------------- data


def load_pairs(plan: Plan, stage: Any, formats: tuple[str, ...], convert: Any) -> tuple[Any, Any | None]:
    """(train, held-out) datasets of a stage, each row passed through `convert(ds, fmt)`; mixtures by weight."""
    recipe = plan.recipe
    parts, evals = [], []
    weights = stage.data if isinstance(stage.data, dict) else dict.fromkeys(names(stage.data), 1.0)
    for name, weight in weights.items():
        spec = recipe.datasets[name]
        fmt, _ = check_format(peek_rows(spec.path) if is_local(spec.path) else [{}], spec, formats, name)
        train, held = train_eval_split(spec, recipe.seed)
        parts.append((convert(train, fmt), weight))
        if held is not None:
            evals.append(convert(held, fmt))
    if getattr(stage, "eval_data", None):
        spec = recipe.datasets[stage.eval_data]
        fmt, _ = check_format(peek_rows(spec.path), spec, formats, stage.eval_data)
        evals.append(convert(train_eval_split(spec, recipe.seed)[0], fmt))
    train_ds = mix(parts, recipe.seed)
    return train_ds, (mix([(e, 1.0) for e in evals], recipe.seed) if evals else None)


# ---------------------------------------------------------------- model


def load_policy(plan: Plan, source: dict[str, Any], work: Path | None = None, **kw: Any) -> Any:
    """The causal LM a stage starts from: the base folder, or an earlier stage's adapter folded into its base."""
    from align.models import load_causal_lm

    dtype = plan.recipe.model.dtype
    if source["kind"] != "model" and kw:
        raise RecipeError("4-bit loading needs a full model as input, not an adapter", "adapter.type")
    folder = input_folder(plan, source, work)
    if folder is None:  # one process or no ZeRO-3: fold the adapter in memory
        from align.models import load_for_inference

        return load_for_inference(source, dtype=dtype).merge_and_unload()
    return load_causal_lm(folder, dtype=dtype, trust_remote_code=plan.recipe.model.trust_remote_code, **kw)


def zero3() -> bool:
    """ZeRO-3 is active: transformers loads every model partitioned (a collective) from here on."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


def input_folder(plan: Plan, source: dict[str, Any], work: Path | None, *, always: bool = False) -> Path | None:
    """A folder holding the whole input model. An adapter input is folded into its base by the main process
    alone and saved once (under ZeRO-3 a fold in every rank would load partitioned weights); the other ranks
    wait, then every rank loads the folder. None: fold in memory instead (no ZeRO-3 and not `always`)."""
    if source["kind"] == "model":
        return Path(source["path"])
    if not (always or zero3()) or work is None:
        return None
    from align.models import load_for_inference

    folder = work / "input-merged"
    if distributed.is_main() and not (folder / "config.json").is_file():
        with distributed.no_zero_init():
            tmp = work / "input-merged.tmp"
            load_for_inference(source, dtype=plan.recipe.model.dtype).merge_and_unload().save_pretrained(
                tmp, safe_serialization=True
            )
            tmp.rename(folder)
    distributed.barrier()
    return folder


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
    """The trainable weights before training (gathered under ZeRO-3; a collective there)."""
    return distributed.trainable_state(model)


def changed_count(before: dict[str, Any], after: dict[str, Any]) -> int:
    import torch

    return sum(int(not torch.equal(before[n], t)) for n, t in after.items() if n in before)


# ---------------------------------------------------------------- train


class EvalBefore(TrainerCallback):
    """Held-out metrics before training, taken once the trainer has wrapped the model for DDP/DeepSpeed.

    A `trainer.evaluate()` before `train()` prepares the model unwrapped, and the DDP wrap is then skipped:
    every rank trains its own weights. On a resumed run the step-0 evaluation comes from the checkpoint's log.
    """

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.metrics: dict[str, Any] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step == 0:
            self.metrics = self.trainer.evaluate()
        else:
            self.metrics = next((h for h in state.log_history if h.get("step") == 0 and "eval_loss" in h), {})


def train(trainer: Any, sp: StagePlan, guard: Guard, *, evaluate_before: bool = False) -> tuple[Any, dict[str, Any]]:
    """Resume from the newest complete checkpoint of this exact configuration; Ctrl-C saves and stops.

    Returns the train result and, with `evaluate_before`, the held-out metrics before the first step."""
    before = EvalBefore(trainer) if evaluate_before else None
    if before is not None:
        trainer.add_callback(before)
    resume = latest_checkpoint(sp)
    if resume is not None and distributed.is_main() and not orchestrated():  # align run's start line says it
        print(f"[align] {sp.name}: resuming from {resume.name}", flush=True)
    guard.resumed_from = resume.name if resume else None
    if resume is not None and distributed.is_main():
        guard.truncate(int(resume.name.split("-")[1]))  # steps after the checkpoint run again, and log again
    with guard.trap_sigint(), disk_full_is_said(sp):
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if distributed.any_rank(guard.interrupted):
        trainer.accelerator.wait_for_everyone()
        raise KeyboardInterrupt
    return result, (before.metrics if before else {})


def save_policy(
    model: Any,
    tokenizer: Any,
    out: Path,
    source: dict[str, Any],
    *,
    trained: dict[str, Any],
    stage: str,
    merge: bool,
    trainer: Any = None,
) -> tuple[dict[str, Any], str | None]:
    """Adapter (or full model) in safetensors with the tokenizer, read back and checked; optionally merged.

    Called on every rank. An adapter is written from `trained`, the trainable weights gathered on every rank
    (under ZeRO-3 `save_pretrained` on rank 0 alone writes 0-sized tensors); a full model goes through the
    trainer's own save, which consolidates ZeRO-3 shards. The main process then verifies the files."""
    adapter = hasattr(model, "peft_config")
    if adapter:
        output = {"kind": "adapter", "path": "adapter", "base": base_of(source)}
        if distributed.is_main():
            model.save_pretrained(out / "adapter", state_dict=trained, safe_serialization=True)
            if os.environ.get(distributed.FAULT_ENV) == "empty-adapter":
                distributed.empty_safetensors(out / "adapter")  # tests: what ZeRO-3's rank-0-only save writes
    else:
        output = {"kind": "model", "path": "model"}
        trainer.save_model(str(out / "model"))  # collective under ZeRO-3
    merged = None
    if distributed.is_main():
        folder = out / output["path"]
        (folder / "training_args.bin").unlink(missing_ok=True)  # a pickle; the config is in config.yaml
        tokenizer.save_pretrained(folder)
        distributed.verify_saved(folder, trained, stage=stage, peft_model=model if adapter else None)
        if merge and adapter:
            from align.models import load_for_inference

            merged = "merged"
            with distributed.no_zero_init():
                m = load_for_inference({**output, "path": str(folder)}).merge_and_unload()
            m.save_pretrained(out / merged, safe_serialization=True)
            tokenizer.save_pretrained(out / merged)
    distributed.barrier()
    return output, merged


def train_metrics(
    trainer: Any, result: Any, guard: Guard, before: dict[str, Any], trained: dict[str, Any]
) -> dict[str, Any]:
    first, last, mean = logged_losses(guard.log_path)  # the whole stage's log: the same after a resume
    return {
        "train_loss": mean if mean is not None else result.training_loss,
        "first_loss": first if first is not None else guard.first_loss,
        "last_loss": last if last is not None else guard.last_loss,
        "steps": trainer.state.global_step,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "trainable_params": sum(t.numel() for t in trained.values()),
        "trainable_tensors_changed": changed_count(before, trained),
        "resumed_from": guard.resumed_from,
        # the trainer's own view (not the environment's): proves the processes really trained together
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "peak_memory_bytes": distributed.peak_memory_bytes(),
        "weights_sha256": distributed.state_hash(trained),
        "trainable_dtype": str(next(iter(trained.values())).dtype).replace("torch.", "") if trained else None,
    }


DISK_MESSAGES = ("iostream error", "No space left", "file write failed", "PytorchStreamWriter failed")


@contextlib.contextmanager
def disk_full_is_said(sp: StagePlan) -> Any:
    """A full disk while a checkpoint is written says so (torch reports `basic_ios::clear: iostream error`), and
    names the checkpoint a re-run resumes from; the partial folder is left as it is, resumable."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        message = disk_full(e, sp)
        if message is None:
            raise
        raise StageFailed(message) from None


def disk_full(exc: BaseException, sp: StagePlan) -> str | None:
    import errno
    import shutil

    chain = [x for x in (exc, exc.__cause__, exc.__context__) if x is not None]
    enospc = any(isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT) for x in chain)
    stream = any(isinstance(x, RuntimeError) and any(m in str(x) for m in DISK_MESSAGES) for x in chain)
    if not (enospc or stream):
        return None
    try:
        free = shutil.disk_usage(sp.partial_dir).free
    except OSError:
        free = 0
    if not enospc and free > 256 * 2**20:
        return None  # a write failed with room to spare: not this (the original error is the better message)
    kept = latest_checkpoint(sp)
    return (
        f"the disk is full: writing stage `{sp.name}`'s checkpoint in {sp.partial_dir} failed ({free / 2**20:.1f} MiB "
        f"free there). Free some space (or point `output_dir` at a larger disk), then run the same command again: "
        + (f"it resumes from {kept.name}" if kept else "no whole checkpoint was written yet, so it starts over")
    )


def logged_losses(log: Path, key: str = "loss") -> tuple[float | None, float | None, float | None]:
    """(first, last, mean per step) of the training loss in a stage's train_log.jsonl, over every attempt: a
    resumed stage reports what an uninterrupted one would. A logged loss averages its logging interval."""
    by_step: dict[int, float] = {}
    try:
        lines = log.read_text().splitlines()
    except OSError:
        return None, None, None
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(rec, dict) and key in rec and "step" in rec and "train_loss" not in rec:
            by_step[int(rec["step"])] = float(rec[key])
    if not by_step:
        return None, None, None
    steps = sorted(by_step)
    total, prev = 0.0, 0
    for step in steps:
        total += by_step[step] * (step - prev)
        prev = step
    return by_step[steps[0]], by_step[steps[-1]], total / steps[-1]


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

    def truncate(self, step: int) -> None:
        """Resuming from checkpoint-`step`: drop the log of the steps after it (they run again)."""
        if not self.log_path.is_file():
            return
        keep = []
        for line in self.log_path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and int(rec.get("step", 0)) <= step and "train_loss" not in rec:
                keep.append(line + "\n")
        self.log_path.write_text("".join(keep))

    def log(self, record: dict[str, Any]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        logs = logs or {}
        self.check(logs, state.global_step)
        if state.is_world_process_zero:
            record = {"step": state.global_step, **logs}
            if "train_loss" in logs:  # the trainer's summary: its mean covers only this attempt's steps
                whole = logged_losses(self.log_path)[2]  # the whole stage's, as metrics.json reports it
                record["train_loss"] = whole if whole is not None else logs["train_loss"]
            self.log(record)

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
