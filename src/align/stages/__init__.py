"""The one explicit list of stage types. Each module reads top to bottom in the same order:
config -> data -> model -> trainer -> train -> save -> metrics, and exposes the same four functions:

    check_args(stage, path) -> problems      static checks of the stage's own fields (no files touched)
    check(plan, sp) -> problems              plan-time checks: files, columns, tokenizer, hardware
    resolved_config(plan, sp) -> dict        defaults align adds beyond the recipe (part of the fingerprint)
    run(plan, sp, out) -> record | None      the work; returns what goes into stage.json (main process)
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

from align.recipe import STAGE_TYPES

if TYPE_CHECKING:
    from pathlib import Path

    from align.pipeline import Plan, StagePlan

MODULES = {
    "sft": "align.stages.sft",
    "reward": "align.stages.reward",
    "dpo": "align.stages.preference",
    "kto": "align.stages.preference",
    "orpo": "align.stages.preference",
    "ppo": "align.stages.ppo",
    "grpo": "align.stages.online",
    "rloo": "align.stages.online",
    "eval": "align.stages.evaluate",
}
assert set(MODULES) == set(STAGE_TYPES), "recipe.STAGE_TYPES and stages.MODULES must list the same types"


def module(stage_type: str) -> ModuleType:
    return importlib.import_module(MODULES[stage_type])


def check_stage_args(stage: Any, path: str) -> list[tuple[str, str]]:
    return module(stage.type).check_args(stage, path)


def plan_checks(plan: Plan) -> list[tuple[str, str]]:
    """Every plan-time problem of every stage, collected so they are all reported at once."""
    from align.pipeline import StagePlan, stage_inputs

    problems: list[tuple[str, str]] = []
    for i, st in enumerate(plan.recipe.stages):
        sp = StagePlan(st, i, stage_inputs(plan.recipe, i), plan.run_dir / st.name, plan.run_dir / ".partial" / st.name)
        problems += module(st.type).check(plan, sp)
    return problems


def run_stage(plan: Plan, sp: StagePlan, out: Path) -> dict[str, Any] | None:
    return module(sp.stage.type).run(plan, sp, out)
