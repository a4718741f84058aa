"""The one module that imports TRL's fast-moving APIs, and checks recipe values against its config classes.

Tested with trl 1.16 (see pyproject.toml for the pinned range). Other modules import trainers and
config classes from here, so a TRL rename is mended in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import re
import types
import typing
import warnings
from typing import Any

from trl import DPOConfig, GRPOConfig, KTOConfig, RewardConfig, RLOOConfig, SFTConfig, SFTTrainer

from align.errors import did_you_mean

__all__ = [
    "DPOConfig",
    "GRPOConfig",
    "KTOConfig",
    "RLOOConfig",
    "RewardConfig",
    "SFTConfig",
    "SFTTrainer",
    "check_trainer_args",
    "orpo_config",
    "trainer",
]


def orpo_config() -> type | None:
    """ORPO lives in `trl.experimental` in trl 1.x (imported here only); None where this TRL lacks it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from trl.experimental.orpo import ORPOConfig
    except ImportError:
        return None
    return ORPOConfig


def trainer(class_name: str) -> type:
    """A TRL trainer class by its name (`DPOTrainer`, `ORPOTrainer`...), imported when a stage runs: trainers pull
    in much more than configs. ORPO's lives in `trl.experimental` in trl 1.x."""
    import trl

    if hasattr(trl, class_name):
        return getattr(trl, class_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental import orpo

    return getattr(orpo, class_name)


# Fields align sets itself from the run directory and the stage; the recipe may not set them.
RESERVED = {
    "output_dir": "align writes to runs/<run>/<stage>/; set `output_dir` at the top of the recipe instead",
    "resume_from_checkpoint": "align resumes interrupted stages by itself; use `align run --force STAGE` to restart",
    "hub_token": "a token in a recipe would land in config.yaml and the run folder; set HF_TOKEN in the "
    "environment (or run `hf auth login`) and align's push reads it from there",
    **dict.fromkeys(
        ("push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "hub_always_push", "hub_revision"),
        "pushing is a stage of its own: add `{type: push, from: STAGE, repo_id: ORG/NAME}` (private, revision: "
        "fields of that stage), or run `align push RUN --repo-id ORG/NAME` after the run",
    ),
}


def check_trainer_args(args: dict[str, Any], config_cls: type, path: str) -> list[tuple[str, str]]:
    """Report unknown names (with the closest TRL name) and values of the wrong type, all at once."""
    types = _field_types(config_cls, init_only=True)
    problems = []
    for key, value in args.items():
        where = f"{path}.{key}"
        if key in RESERVED:
            problems.append((where, f"not allowed here: {RESERVED[key]}"))
        elif key not in types:
            problems.append((where, f"unknown {config_cls.__name__} field{did_you_mean(key, types)}"))
        elif not _matches(types[key], value) and not (key in _LISTED_IN_HELP and isinstance(value, str)):
            # (TRL takes one loss type as a plain string too)
            problems.append((where, f"expected {_type_name(types[key])}, got {value!r} ({type(value).__name__})"))
        elif (choices := field_choices(config_cls, key)) and (
            bad := [
                v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str) and v not in choices
            ]
        ):
            problems.append((where, f"`{bad[0]}` is not one of {', '.join(choices)}{did_you_mean(bad[0], choices)}"))
    return problems


_LISTED_IN_HELP = {"loss_type"}  # TRL lists these fields' values only in their help text (checked at train time)
_VALUES = re.compile(r"(?:Possible|Supported|Valid|Allowed) values are:?\s*(.*?)(?:\.\s|\.?$)", re.S)


def field_choices(config_cls: type, name: str) -> list[str]:
    """The values TRL accepts for a string field: its `choices` metadata, or the list its help text gives
    ("Possible values are: 'sigmoid', 'hinge', ..."), which is what the trainer checks later. [] when open."""
    for f in dataclasses.fields(config_cls):
        if f.name != name:
            continue
        if f.metadata.get("choices"):
            return [str(c) for c in f.metadata["choices"]]
        tp = _field_types(config_cls).get(name, f.type)
        for member in typing.get_args(tp) if _is_union(tp) else (tp,):
            if isinstance(member, type) and issubclass(member, enum.Enum):  # `SchedulerType | str`: the enum's values
                return [str(m.value) for m in member]
        found = _VALUES.search(str(f.metadata.get("help", ""))) if name in _LISTED_IN_HELP else None
        values = re.findall(r"'([A-Za-z0-9_.\-]+)'", found.group(1)) if found else []
        default = f.default_factory() if f.default is dataclasses.MISSING and callable(f.default_factory) else f.default
        defaults = default if isinstance(default, list) else [default]
        # a help text that does not list its own default is not a list to trust
        return values if values and all(d in values for d in defaults if isinstance(d, str)) else []
    return []


def coerce_trainer_args(args: dict[str, Any], config_cls: type) -> dict[str, Any]:
    """A quoted number (`"2e-5"`, or an override's string) becomes a number where TRL wants one; unquoted
    exponents are numbers already (align.yamlio)."""
    types = _field_types(config_cls)
    out = dict(args)
    for k, v in args.items():
        if isinstance(v, str) and k in types and _accepts(types[k], float) and not _accepts(types[k], str):
            with contextlib.suppress(ValueError):
                out[k] = int(v) if _accepts(types[k], int) and v.lstrip("-").isdigit() else float(v)
    return out


def _field_types(config_cls: type, init_only: bool = False) -> dict[str, Any]:
    """Each dataclass field's type, with string annotations (`from __future__ import annotations`) resolved; the raw
    annotations where they cannot be (a name imported only under TYPE_CHECKING, say)."""
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(config_cls) if f.init or not init_only}


def _accepts(tp: Any, base: type) -> bool:
    if tp is base:
        return True
    return any(_accepts(a, base) for a in typing.get_args(tp)) if _is_union(tp) else False


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _matches(tp: Any, value: Any) -> bool:
    """A forgiving structural type check: catches `learning_rate: fast`, not every subtlety."""
    if tp is Any or isinstance(tp, str | typing.TypeVar):
        return True
    if _is_union(tp):
        return any(_matches(a, value) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        if isinstance(value, str):
            try:
                float(value)
                return True
            except ValueError:
                return False
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value in {m.value for m in tp} or value in {m.name for m in tp}
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        return isinstance(value, list | tuple)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return True


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    name = getattr(tp, "__name__", None)
    return name if name and not _is_union(tp) else str(tp).replace("typing.", "")
