"""The recipe pieces every stage type shares (model, datasets, adapter, launch, a stage's name and input).

A stage type's own spec (its `type:` and fields) lives in its module under `align.stages`; `align.recipe`
joins them into the recipe schema. Leaf module: imports nothing of align's but the error types.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator
from pydantic_core import PydanticCustomError

from align.errors import RecipeError, did_you_mean

AdapterType = Literal["lora", "dora", "qlora", "full"]
DataFormat = Literal["auto", "messages", "prompt_completion", "alpaca", "text", "preference", "hh_rlhf"]
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
SEED_MAX = 2**32 - 1  # numpy's seed range; transformers' set_seed seeds numpy too
MAX_LORA_RANK = 16384  # no model's hidden size is larger; the exact bound (the model's) is checked at plan time


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSpec(Strict):
    """The base model: `smollm2-135m-instruct` (embedded), a local folder, or a hub id."""

    name_or_path: str
    revision: str | None = None
    trust_remote_code: StrictBool = Field(False, description='true or false; a string such as "yes" is refused')
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    chat_template: str | None = Field(None, description="path to a .jinja file that replaces the tokenizer's")


class DatasetSpec(Strict):
    """One named dataset: a local file/folder (json, jsonl, csv, parquet) or a hub id."""

    path: str = Field(min_length=1, pattern=r"\S", description="a local file or folder, or a hub dataset id")
    format: DataFormat = "auto"
    split: str = "train"
    subset: str | None = Field(None, description="hub dataset configuration name")
    columns: dict[str, str] = Field(default_factory=dict, description="rename: {their_column: our_column}")
    max_samples: int | None = Field(None, gt=0)
    eval_fraction: float | None = Field(None, gt=0, lt=1, description="hold out this share for evaluation")
    eval_path: str | None = Field(None, description="a separate held-out file instead of eval_fraction")

    @model_validator(mode="after")
    def _one_eval_source(self) -> DatasetSpec:
        if self.eval_fraction is not None and self.eval_path is not None:
            raise ValueError("set either eval_fraction or eval_path, not both")
        return self


class AdapterSpec(Strict):
    """How the stage adapts the model. `full` trains every weight; the others are peft adapters."""

    type: AdapterType = "lora"
    r: int = Field(16, gt=0, le=MAX_LORA_RANK, description="LoRA rank; at most the model's hidden size")
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    modules_to_save: list[str] | None = None


class LaunchSpec(Strict):
    """How the orchestrator starts the stage process (hardware lives in accelerate_configs/)."""

    accelerate_config: str = Field(
        "auto", description="a name in accelerate_configs/ or a path; auto picks cpu/single_gpu"
    )
    num_processes: int | None = Field(None, gt=0)
    mode: Literal["accelerate", "python"] = Field("accelerate", description="python: a plain subprocess, no launcher")


class StageSpec(Strict):
    """What every stage says: its name, its type, where its input model comes from, how it is launched."""

    type: str
    name: str = Field(pattern=NAME_PATTERN)
    source: str | None = Field(
        None, alias="from", description="where the input model comes from: `base` or a stage name"
    )
    launch: LaunchSpec = Field(default_factory=LaunchSpec)


DataRef = str | list[str] | dict[str, float]


class TrainSpec(StageSpec):
    """A stage that trains on recipe datasets with an adapter (or full weights) and trainer arguments."""

    data: DataRef = Field(description="dataset name(s); a mapping gives mixture weights")
    eval_data: str | None = None
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    train: dict[str, Any] = Field(default_factory=dict, description="the trainer's config fields, by their names")

    @field_validator("data")
    @classmethod
    def _names_a_dataset(cls, v: DataRef) -> DataRef:
        if not v:
            raise PydanticCustomError(
                "no_dataset",
                "names no dataset; write `data: train` (a name under `datasets:`), a list of names, or a mapping "
                "of names to mixture weights",
            )
        return v


def data_names(data: DataRef) -> list[str]:
    return [data] if isinstance(data, str) else list(data)


class RecipeSpec(Strict):
    """The recipe without its stage union (which `align.recipe.Recipe` adds from the stage registry)."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    model: ModelSpec
    output_dir: str = Field("runs", description="run folders go to <output_dir>/<name>/")
    seed: int = Field(42, ge=0, le=SEED_MAX)
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    stages: list[StageSpec] = Field(min_length=1)

    @field_validator("datasets", mode="before")
    @classmethod
    def _datasets_mapping(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, dict):
            raise PydanticCustomError(
                "datasets_shape",
                f"must be a mapping of dataset names to specs, not a {type(v).__name__}; write "
                "`datasets: {train: {path: ./train.jsonl}}` and name `train` in a stage's `data:`",
            )
        return {} if v is None else v

    @field_validator("stages")
    @classmethod
    def _value_ranges(cls, stages: list[Any]) -> list[Any]:
        problems: list[tuple[str, str]] = []
        for i, st in enumerate(stages):
            where = f"stages[{i}]({st.name})"
            if isinstance(getattr(st, "train", None), dict):
                problems += train_value_problems(st.train, f"{where}.train")
            if isinstance(getattr(st, "data", None), dict):
                problems += weight_problems(st.data, f"{where}.data")
        if problems:
            raise SpecProblems(problems)
        return stages

    def stage(self, name: str) -> Any:
        for st in self.stages:
            if st.name == name:
                return st
        raise RecipeError(f"no stage named `{name}`{did_you_mean(name, [s.name for s in self.stages])}", "stage")


# ---------------------------------------------------------------- value ranges of `train:` (a free mapping)


class SpecProblems(RecipeError, ValueError):
    """Problems found by a validator: a ValueError, so pydantic goes on collecting the other fields' errors, and a
    RecipeError, so `align.recipe` reports each with its own field path (`stages[0](sft).train.learning_rate`)."""


POSITIVE = ("learning_rate", "value_learning_rate", "num_train_epochs", "temperature")
AT_LEAST_ONE = (
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "eval_accumulation_steps",
    "batch_size",
    "mini_batch_size",
    "max_length",
    "max_prompt_length",
    "max_completion_length",
)
INTERVALS = ("save_steps", "logging_steps", "eval_steps")  # > 0; below 1 transformers reads a share of the run
SEEDS = ("seed", "data_seed")
NON_NEGATIVE = ("weight_decay", "warmup_steps", "adam_epsilon")
UNIT_INTERVAL = ("adam_beta1", "adam_beta2")  # [0, 1): torch's AdamW refuses the rest only when the stage starts
HINTS = {
    "learning_rate": "; typical: 1e-4..1e-3 for a LoRA adapter, 1e-5..5e-5 for full weights",
    "num_train_epochs": "; or set `max_steps`",
    "temperature": "; sampling needs a temperature above 0 (1.0 samples from the model as it is)",
}


def as_number(v: Any) -> float | None:
    """The value as a number (a quoted "2e-5" too, as the trainer arguments are coerced); None if not one (the
    type check reports those)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def train_value_problems(train: dict[str, Any], path: str) -> list[tuple[str, str]]:
    """Values the trainer would accept and then misbehave on (transformers takes `learning_rate: -1`,
    `per_device_train_batch_size: 0`, `max_steps: -5` and `seed: 2**70` without a word)."""
    out = []
    for key, value in train.items():
        x = as_number(value)
        if x is None:
            continue
        where, got = f"{path}.{key}", f"(got {value!r})"
        if not math.isfinite(x):
            out.append((where, f"must be a finite number {got}"))
        elif key in POSITIVE and x <= 0:
            out.append((where, f"must be greater than 0 {got}{HINTS.get(key, '')}"))
        elif key in AT_LEAST_ONE and x < 1:
            out.append((where, f"must be at least 1 {got}"))
        elif key in INTERVALS and x <= 0:
            out.append((where, f"must be greater than 0 {got}: a whole number of steps, or below 1 a share of the run"))
        elif key in NON_NEGATIVE and x < 0:
            out.append((where, f"must be 0 or more {got}"))
        elif key == "max_grad_norm" and x < 0:
            out.append((where, f"must be 0 or more {got}; 0 turns gradient clipping off, 1.0 is usual"))
        elif key in UNIT_INTERVAL and not 0 <= x < 1:
            out.append((where, f"must be at least 0 and below 1 {got}; AdamW's usual betas are 0.9 and 0.999"))
        elif key == "max_steps" and x != -1 and x < 1:
            out.append((where, f"must be at least 1, or -1 to train for `num_train_epochs` epochs {got}"))
        elif key in SEEDS and not (x == int(x) and 0 <= x <= SEED_MAX):
            out.append((where, f"must be a whole number from 0 to {SEED_MAX} (2**32 - 1) {got}"))
    return out


def weight_problems(weights: dict[str, Any], path: str) -> list[tuple[str, str]]:
    """Mixture weights: each dataset's share, > 0 (weight 2 repeats a dataset twice)."""
    out = []
    for name, w in weights.items():
        x = as_number(w)
        if x is not None and not (math.isfinite(x) and x > 0):
            out.append(
                (
                    f"{path}.{name}",
                    f"mixture weight must be a positive number (got {w!r}); to leave `{name}` out, "
                    "remove it from the mapping",
                )
            )
    return out
