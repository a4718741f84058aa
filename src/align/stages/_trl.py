"""The one skeleton of the stages that train with a TRL trainer (sft, reward, dpo/kto/orpo, grpo/rloo).

`TRLStage.run` reads top to bottom: config -> data -> model -> trainer -> train -> save -> metrics. A stage
type fills in small hooks (how it converts its data, loads its model, what its trainer takes besides the
common arguments, how it saves, which metrics it adds); PPO and eval implement `run()` themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from align import distributed, tracking
from align.console import trainer_progress
from align.errors import NothingLearned
from align.models import peft_config, plan_tokenizer
from align.rundir import Plan, StagePlan, input_artifact, write_common, write_metrics
from align.spec import data_names
from align.stages._train import (
    Guard,
    changed_count,
    check_chat_template,
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
)
from align.stages.base import Default, Problem, Record, Stage, apply_defaults
from align.trl_compat import check_trainer_args, coerce_trainer_args, trainer

# align's defaults where TRL's do not suit a pipeline (everything else is TRL's own default).
TRAIN_DEFAULTS: tuple[Default, ...] = (
    Default("report_to", "none", "no experiment tracker is assumed; name one to log to it"),
    Default("logging_steps", 1, "the NaN guard and train_log.jsonl see every step"),
    Default("logging_nan_inf_filter", False, "transformers would hide a NaN loss from the log (and the guard)"),
    Default("save_strategy", "steps", "checkpoints every `save_steps`, so an interrupted stage resumes"),
    Default("save_steps", 20, "frequent, cheap adapter checkpoints make kill-and-resume lose little"),
    Default("save_total_limit", 2, "the newest checkpoint may be cut short by a kill; the one before is whole"),
    Default("activation_checkpointing", False, "recompute costs ~30% speed; turn on for models that do not fit"),
    Default("dataloader_num_workers", 0, "worker processes buy nothing on small tokenized sets and fork CUDA"),
    Default(
        "ddp_find_unused_parameters",
        False,
        "every trainable weight (an adapter, a score head) takes part in each step, so DDP's search for unused "
        "ones is a wasted pass (and a warning per process); set true for weights used conditionally (MoE experts)",
    ),
)


ALIGN_STATE_FILE = "align_trainer_state"


class CheckpointedState:
    """Mixed into a TRL trainer: its `checkpointed` attributes go into each checkpoint and come back on resume.

    Written beside the RNG state, so before trainer_state.json, which marks a checkpoint complete (a kill between
    them leaves a checkpoint no resume picks); read back with the RNG state, before the first resumed step. One file
    per process, as the RNG state. A checkpoint without it (an older align) resumes as TRL alone does.
    """

    checkpointed: ClassVar[tuple[str, ...]] = ()

    def _align_state_file(self, folder: str) -> Path:
        rank = "" if self.args.world_size <= 1 else f"_{self.args.process_index}"
        return Path(folder) / f"{ALIGN_STATE_FILE}{rank}.pt"

    def _save_rng_state(self, output_dir: str) -> None:
        import torch

        super()._save_rng_state(output_dir)  # type: ignore[misc]
        state = {name: getattr(self, name) for name in self.checkpointed if hasattr(self, name)}
        torch.save(state, self._align_state_file(output_dir))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        import torch

        super()._load_rng_state(checkpoint)  # type: ignore[misc]
        if checkpoint is None or not self._align_state_file(checkpoint).is_file():
            return
        state = torch.load(self._align_state_file(checkpoint), map_location=self.accelerator.device, weights_only=True)
        for name, value in state.items():
            setattr(self, name, value)


@dataclass
class Trained:
    """What a stage's own metrics are read from once training is over."""

    trainer: Any  # the TRL trainer
    eval_ds: Any  # the held-out set, or None
    before: dict[str, Any]  # held-out metrics before the first step (with `evaluate_before`)
    heldout: str | None  # where the held-out set came from
    common: dict[str, Any]  # the metrics every training stage records (train_metrics)


class TRLStage(Stage):
    trainer_name: ClassVar[str]  # the TRL trainer class (align.trl_compat.trainer)
    evaluate_before: ClassVar[bool] = False  # held-out metrics before the first step too
    peft_task: ClassVar[str] = "CAUSAL_LM"
    defaults = TRAIN_DEFAULTS
    # a finished stage whose trainable weights did not move learned nothing: not marked done (exit 1). Online RL
    # opts out: a batch whose group rewards are all equal has zero advantage and leaves the weights as they are
    unchanged_is_failure: ClassVar[bool] = True

    # ------------------------------------------------------------ recipe time

    def check_args(self, spec: Any, where: str) -> list[Problem]:
        problems = check_trainer_args(spec.train, self.trainer_config, f"{where}.train")
        if spec.adapter.type == "qlora" and "qlora" not in self.adapters:
            problems.append((f"{where}.adapter.type", f"{spec.type} stages take `lora`, `dora` or `full`"))
        if getattr(spec, "merge", False) and spec.adapter.type == "full":
            problems.append(
                (f"{where}.merge", "`merge` folds an adapter into the base; with `adapter.type: full` drop it")
            )
        return problems + self.check_fields(spec, where)

    adapters: ClassVar[tuple[str, ...]] = ("lora", "dora", "full")

    def check_fields(self, spec: Any, where: str) -> list[Problem]:
        """Hook: static checks of the stage type's own fields."""
        return []

    def dataset_refs(self, spec: Any) -> list[tuple[str, str]]:
        refs = [(n, "data") for n in data_names(spec.data)]
        return refs + ([(spec.eval_data, "eval_data")] if getattr(spec, "eval_data", None) else [])

    # ------------------------------------------------------------ plan time

    def check(self, plan: Plan, sp: StagePlan) -> list[Problem]:
        formats, problems = check_data(plan, sp, self.formats)
        problems += check_chat_template(plan, sp, list(formats))
        problems += self.check_inputs(plan, sp, formats)
        args = self.train_args(plan, sp)
        problems += tracking.check(args.get("report_to"), f"{sp.where}.train.report_to")
        return problems + check_trl_args(self.trainer_config, args, sp.where)

    def check_inputs(self, plan: Plan, sp: StagePlan, formats: dict[str, str]) -> list[Problem]:
        """Hook: plan-time checks beyond the data formats and TRL's own argument checks."""
        return []

    def train_args(self, plan: Plan, sp: StagePlan, work: Path | None = None) -> dict[str, Any]:
        """The trainer's arguments: align's defaults, device flags, the recipe's `train:`, then what align sets."""
        spec = sp.stage
        args = {
            **apply_defaults(self.defaults, spec.adapter.type),
            **device_args(plan.recipe.seed, plan.recipe.model.dtype),
            **coerce_trainer_args(spec.train, self.trainer_config),
        }
        if work is not None:
            args["output_dir"] = str(work / "checkpoints")
        args.update(
            tracking.trainer_fields(self.trainer_config, plan.run_dir, sp.name, args.get("report_to"), spec.train)
        )
        return {**args, **self.fixed_args(plan, sp, args)}

    def fixed_args(self, plan: Plan, sp: StagePlan, args: dict[str, Any]) -> dict[str, Any]:
        """Hook: arguments align derives from the stage's own fields (they win over `train:`)."""
        return {}

    def resolved_config(self, plan: Plan, sp: StagePlan) -> dict[str, Any]:
        return self.train_args(plan, sp)

    # ------------------------------------------------------------ the stage process

    def run(self, plan: Plan, sp: StagePlan, out: Path) -> Record | None:
        spec = sp.stage
        # config
        args_dict = self.train_args(plan, sp, sp.partial_dir)
        write_common(sp, plan, out, self.config_record(plan, sp, args_dict))
        args = self.trainer_config(**args_dict)
        tracking.apply(plan.run_dir, sp.name, args_dict.get("report_to"))
        source = input_artifact(plan, sp.inputs[0])
        tokenizer = plan_tokenizer(plan)

        # data
        train_ds, eval_ds, heldout = self.load_data(plan, sp, tokenizer)

        # model
        model = self.load_model(plan, sp, source, tokenizer)
        peft_cfg = None if spec.adapter.type == "full" else peft_config(spec.adapter, task_type=self.peft_task)

        # trainer
        guard = Guard(out / "train_log.jsonl", sp.partial_dir)
        trl_trainer = self.trainer_class()(
            model=model,
            args=args,
            train_dataset=train_ds,
            processing_class=tokenizer,
            peft_config=peft_cfg,
            callbacks=[guard],
            **self.trainer_kwargs(plan, sp, eval_ds),
        )
        trainer_progress(trl_trainer, sp.name)
        before = trainable_snapshot(trl_trainer.model)

        # train (every rank; a "before" evaluation runs once the model is wrapped), then prove on every rank
        # what rank 0 saves
        evaluate_before = self.evaluate_before and eval_ds is not None
        result, ev_before = train(trl_trainer, sp, guard, evaluate_before=evaluate_before)
        trained = distributed.check_ranks_agree(trl_trainer.model, sp.name, out)
        if self.unchanged_is_failure and trl_trainer.state.global_step and not changed_count(before, trained):
            raise NothingLearned(  # every rank holds the same weights (checked above): every rank raises
                f"stage `{sp.name}`: no trainable weight changed in {trl_trainer.state.global_step} steps (loss "
                f"{guard.first_loss} -> {guard.last_loss}), so nothing was learned and the stage is not marked done. "
                f"Usual causes: `train.max_length` ({args_dict.get('max_length')}) cuts off every completion so no "
                "token is trained; a learning rate of 0; data with no trainable target"
            )

        # save (every rank takes part; the main process writes and verifies)
        output, merged = self.save(plan, sp, trl_trainer, tokenizer, out, source, trained)

        # metrics (a held-out evaluation is a collective: every rank)
        metrics = train_metrics(trl_trainer, result, guard, before, trained)
        metrics.update(self.stage_metrics(plan, sp, Trained(trl_trainer, eval_ds, ev_before, heldout, metrics)))
        if not distributed.is_main():
            return None
        write_metrics(out, metrics)
        return {"type": self.name, "output": output, "merged": merged, "metrics": metrics}

    def config_record(self, plan: Plan, sp: StagePlan, args: dict[str, Any]) -> dict[str, Any]:
        """config.yaml: the stage as written, the trainer's arguments, and which of them are align's defaults."""
        return {
            "stage": sp.stage.model_dump(mode="json", by_alias=True),
            "train_args": args,
            "align_defaults": {d.key: {"value": d.value, "why": d.why} for d in self.applied_defaults(plan, sp)},
        }

    def load_data(self, plan: Plan, sp: StagePlan, tokenizer: Any) -> tuple[Any, Any, str | None]:
        """(train, held-out or None, where the held-out set came from) with rows converted by `convert`."""
        chat = bool(tokenizer.chat_template)
        train_ds, eval_ds = load_pairs(
            plan, sp.stage, self.formats, lambda ds, f: self.convert(ds, f, chat=chat, spec=sp.stage, tok=tokenizer)
        )
        return train_ds, eval_ds, None

    def convert(self, ds: Any, fmt: str, *, chat: bool, spec: Any, tok: Any) -> Any:
        raise NotImplementedError

    def load_model(self, plan: Plan, sp: StagePlan, source: dict[str, Any], tokenizer: Any) -> Any:
        """The policy: the input model (an adapter input folded into its base)."""
        model = load_policy(plan, source, sp.partial_dir)
        set_pad(model, tokenizer)
        return model

    # Trainer attributes TRL keeps outside its checkpoints that a resumed run needs to go on as an uninterrupted one:
    # the token count TRL logs as `num_tokens` (the sft, reward and preference trainers count it themselves).
    checkpointed: ClassVar[tuple[str, ...]] = ("_total_train_tokens",)

    def trainer_class(self) -> type:
        """TRL's trainer, whose checkpoints also carry the `checkpointed` attributes (`CheckpointedState`)."""
        base = trainer(self.trainer_name)
        fields = {"__module__": __name__, "checkpointed": self.checkpointed}
        return type(base.__name__, (CheckpointedState, base), fields)

    def trainer_kwargs(self, plan: Plan, sp: StagePlan, eval_ds: Any) -> dict[str, Any]:
        return {"eval_dataset": eval_ds}

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
        return save_policy(
            trl_trainer.model,
            tokenizer,
            out,
            source,
            trained=trained,
            stage=sp.name,
            merge=getattr(sp.stage, "merge", False),
            trainer=trl_trainer,
        )

    def stage_metrics(self, plan: Plan, sp: StagePlan, t: Trained) -> dict[str, Any]:
        """Hook: the stage type's own metrics (called on every rank: a held-out evaluation is a collective)."""
        return {}
