"""The one list of stage types. A new stage type is one module under `align.stages` and one line here."""

from __future__ import annotations

from align.errors import RecipeError, did_you_mean
from align.spec import StageSpec
from align.stages.base import Stage
from align.stages.evaluate import Eval
from align.stages.online import GRPO, RLOO
from align.stages.ppo import PPO
from align.stages.preference import DPO, KTO, ORPO
from align.stages.push import Push
from align.stages.reward import Reward
from align.stages.sft import SFT

STAGES: tuple[Stage, ...] = (SFT(), Reward(), DPO(), KTO(), ORPO(), PPO(), GRPO(), RLOO(), Eval(), Push())
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
STAGE_TYPES: tuple[str, ...] = tuple(BY_NAME)


def stage_type(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise RecipeError(
            f"unknown stage type `{name}`{did_you_mean(name, STAGE_TYPES)}; known: {', '.join(STAGE_TYPES)}", "type"
        ) from None


def known(name: str) -> Stage | None:
    """The stage type of a run folder's stage.json `type`, or None (written by another version of align)."""
    return BY_NAME.get(name)


def is_eval(name: str) -> bool:
    return bool((k := known(name)) and k.evaluates)


def is_online_rl(name: str) -> bool:
    return bool((k := known(name)) and k.memory.generates)


def is_trl(name: str) -> bool:
    return bool((k := known(name)) and getattr(k, "trainer_name", None))


def stage_of(spec: StageSpec) -> Stage:
    """The stage type of a stage in a recipe."""
    return BY_NAME[spec.type]
