"""The stage interface: one class per stage type, registered in `align.stages.registry`.

A stage type declares, as data: its type name, its recipe spec (a pydantic model with `type: Literal[...]`),
the data formats it accepts, its trainer config class, its defaults (each with a reason, shown by
`align plan --defaults` and recorded in config.yaml), and what memory it needs. It implements:

    check_args(spec, where)      static checks of its own fields (no files touched)
    check(plan, sp)              plan-time checks: files, columns, tokenizer, reward, trainer arguments
    resolved_config(plan, sp)    what align adds beyond the recipe (part of the fingerprint)
    run(plan, sp, out)           the work, on every process; returns what goes into stage.json (main process)
    headline(metrics)            one line for the closing summary
    writes(spec)                 what the stage folder will hold, for the plan table

and may refine how it links into the recipe (`inputs`, `links`), its batch and launch checks, and its
memory input. Stages read and write the run folder through `align.rundir`, never through the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from align.memory import StageMemoryInput, Workload
from align.rundir import Plan, StagePlan
from align.spec import RecipeSpec, StageSpec

Problem = tuple[str, str]  # (field path, message)
Record = dict[str, Any]


@dataclass(frozen=True)
class Default:
    """One of align's defaults for a trainer field, where the trainer's own does not suit a pipeline."""

    key: str
    value: Any
    why: str
    only: str | None = None  # "adapter": only with a peft adapter; "full": only for full fine-tuning

    def applies(self, adapter_type: str | None) -> bool:
        if self.only is None:
            return True
        return (adapter_type == "full") == (self.only == "full")


def apply_defaults(defaults: tuple[Default, ...], adapter_type: str | None) -> dict[str, Any]:
    return {d.key: d.value for d in defaults if d.applies(adapter_type)}


class Stage:
    """A stage type. Subclasses set the class attributes and implement `check`, `resolved_config`, `run`."""

    name: ClassVar[str]  # the `type:` a recipe writes
    spec: ClassVar[type[StageSpec]]
    formats: ClassVar[tuple[str, ...]] = ()  # data formats accepted (align.data.REQUIRED names)
    trainer_config: ClassVar[type | None] = None  # what `train:` is checked against
    defaults: ClassVar[tuple[Default, ...]] = ()
    memory: ClassVar[Workload] = Workload()
    produces_policy: ClassVar[bool] = False  # its output is the next stage's model (and an eval target)
    produces_reward: ClassVar[bool] = False  # its output is a reward model online RL stages read
    follows_cli_launch: ClassVar[bool] = True  # `align run --accelerate-config` sets its launch
    source_must_be_policy: ClassVar[bool] = True  # `from:` names a policy stage (or `base`)
    evaluates: ClassVar[bool] = False  # it scores models (its output is metrics, not a model)
    path_fields: ClassVar[tuple[str, ...]] = ()  # fields that may name a file: `./x` is relative to the recipe

    # ------------------------------------------------------------ recipe time (no files touched)

    def check_args(self, spec: Any, where: str) -> list[Problem]:
        return []

    def dataset_refs(self, spec: Any) -> list[tuple[str, str]]:
        """(dataset name, field) pairs the stage reads."""
        return []

    def links(self, recipe: RecipeSpec, spec: Any, where: str, kind: Callable[[StageSpec], Stage]) -> list[Problem]:
        """Cross-stage checks of this stage's references (beyond `from:`), against the earlier stages."""
        return []

    def inputs(
        self, recipe: RecipeSpec, spec: Any, default_source: str, kind: Callable[[StageSpec], Stage]
    ) -> list[str]:
        """`base` or the stage names this stage reads; their outputs' hashes are part of its fingerprint."""
        return [spec.source or default_source]

    # ------------------------------------------------------------ plan time

    def preflight(self, plan: Plan, sp: StagePlan) -> None:
        """Checks that need the network or credentials, run by `align run` before any stage (raise RecipeError)."""

    def check(self, plan: Plan, sp: StagePlan) -> list[Problem]:
        raise NotImplementedError

    def resolved_config(self, plan: Plan, sp: StagePlan) -> dict[str, Any]:
        raise NotImplementedError

    def applied_defaults(self, plan: Plan, sp: StagePlan) -> list[Default]:
        """The defaults that hold for this stage (not set by the recipe), for the plan and config.yaml."""
        adapter = getattr(getattr(sp.stage, "adapter", None), "type", None)
        train = getattr(sp.stage, "train", {}) or {}
        return [d for d in self.defaults if d.applies(adapter) and d.key not in train]

    def batch(self, plan: Plan, sp: StagePlan) -> tuple[int, int]:
        """(micro batch per process, gradient accumulation) after align's and the trainer's defaults."""
        resolved = self.resolved_config(plan, sp)
        fields = self.trainer_config.__dataclass_fields__ if self.trainer_config else {}

        def get(key: str) -> int:
            return int(resolved[key] if key in resolved else fields[key].default)

        return get("per_device_train_batch_size"), get("gradient_accumulation_steps")

    def launch_problems(self, info: Any, where: str) -> list[Problem]:
        """What this stage type cannot run under (checked with the launch, before anything runs)."""
        return []

    def memory_input(self, plan: Plan, sp: StagePlan, common: dict[str, Any]) -> StageMemoryInput:
        resolved = self.resolved_config(plan, sp)
        fields = self.trainer_config.__dataclass_fields__ if self.trainer_config else {}

        def get(key: str, default: Any = None) -> Any:
            return resolved[key] if key in resolved else (fields[key].default if key in fields else default)

        ac = get("activation_checkpointing")  # the new name; None: the deprecated gradient_checkpointing decides
        ckpt = bool(ac if ac is not None else get("gradient_checkpointing", False))
        return StageMemoryInput(
            self.memory, **common, seq_len=int(get("max_length") or 1024), activation_checkpointing=ckpt
        )

    # ------------------------------------------------------------ the stage process

    def run(self, plan: Plan, sp: StagePlan, out: Path) -> Record | None:
        raise NotImplementedError

    # ------------------------------------------------------------ presentation

    def traits(self) -> dict[str, Any]:
        """What stage.json records of the type, so a run folder describes itself without align's registry."""
        return {
            "evaluates": self.evaluates,
            "online_rl": self.memory.generates,
            "produces_policy": self.produces_policy,
            "produces_reward": self.produces_reward,
            "trainer": getattr(self, "trainer_name", None)
            or (self.trainer_config.__name__ if self.trainer_config else None),
        }

    def describe_inputs(self, sp: StagePlan) -> str:
        """The plan table's input column."""
        return ", ".join(sp.inputs)

    def plan_fields(self, sp: StagePlan) -> dict[str, Any]:
        """Extra fields of the stage's row in `align plan --json`."""
        return {}

    def headline(self, m: dict[str, Any]) -> str:
        return "see summary.md"

    def writes(self, spec: Any) -> str:
        adapter = getattr(spec, "adapter", None)
        if adapter is None:
            return "metrics.json"
        art = "model/" if adapter.type == "full" else f"{adapter.type} adapter/"
        return art + (" + merged/" if getattr(spec, "merge", False) else "")


def fmt(m: dict[str, Any], key: str, spec: str = ".3f") -> str:
    v = m.get(key)
    return format(v, spec) if isinstance(v, int | float) else "-"


def loss_line(m: dict[str, Any]) -> str:
    return f"loss {fmt(m, 'first_loss')} -> {fmt(m, 'last_loss')}, {m.get('steps')} steps"
