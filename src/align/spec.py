"""The recipe pieces every stage type shares (model, datasets, adapter, launch, a stage's name and input).

A stage type's own spec (its `type:` and fields) lives in its module under `align.stages`; `align.recipe`
joins them into the recipe schema. Leaf module: imports nothing of align's but the error types.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from align.errors import RecipeError, did_you_mean

AdapterType = Literal["lora", "dora", "qlora", "full"]
DataFormat = Literal["auto", "messages", "prompt_completion", "alpaca", "text", "preference", "hh_rlhf"]
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSpec(Strict):
    """The base model: `smollm2-135m-instruct` (embedded), a local folder, or a hub id."""

    name_or_path: str
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    chat_template: str | None = Field(None, description="path to a .jinja file that replaces the tokenizer's")


class DatasetSpec(Strict):
    """One named dataset: a local file/folder (json, jsonl, csv, parquet) or a hub id."""

    path: str
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
    r: int = Field(16, gt=0)
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


def data_names(data: DataRef) -> list[str]:
    return [data] if isinstance(data, str) else list(data)


class RecipeSpec(Strict):
    """The recipe without its stage union (which `align.recipe.Recipe` adds from the stage registry)."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    model: ModelSpec
    output_dir: str = Field("runs", description="run folders go to <output_dir>/<name>/")
    seed: int = 42
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    stages: list[StageSpec] = Field(min_length=1)

    def stage(self, name: str) -> Any:
        for st in self.stages:
            if st.name == name:
                return st
        raise RecipeError(f"no stage named `{name}`{did_you_mean(name, [s.name for s in self.stages])}", "stage")
