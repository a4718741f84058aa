"""Recipe schema, `extends:` composition, `a.b.c=value` overrides and validation.

The pydantic models below are the single source of truth for what a recipe may say; trainer
arguments are checked against the installed TRL config class instead of being re-declared.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from align.errors import RecipeError, did_you_mean
from align.yamlio import load_yaml_text

AdapterType = Literal["lora", "dora", "qlora", "full"]
DataFormat = Literal["auto", "messages", "prompt_completion", "alpaca", "text", "preference", "hh_rlhf"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSpec(_Strict):
    """The base model: `smollm2-135m-instruct` (embedded), a local folder, or a hub id."""

    name_or_path: str
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    chat_template: str | None = Field(None, description="path to a .jinja file that replaces the tokenizer's")


class DatasetSpec(_Strict):
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


class AdapterSpec(_Strict):
    """How the stage adapts the model. `full` trains every weight; the others are peft adapters."""

    type: AdapterType = "lora"
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    modules_to_save: list[str] | None = None


class LaunchSpec(_Strict):
    """How the orchestrator starts the stage process (hardware lives in accelerate_configs/)."""

    accelerate_config: str = Field(
        "auto", description="a name in accelerate_configs/ or a path; auto picks cpu/single_gpu"
    )
    num_processes: int | None = Field(None, gt=0)
    mode: Literal["accelerate", "python"] = Field("accelerate", description="python: a plain subprocess, no launcher")


class _StageBase(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    source: str | None = Field(
        None, alias="from", description="where the input model comes from: `base` or a stage name"
    )


class SFTStage(_StageBase):
    type: Literal["sft"]
    data: str | list[str] | dict[str, float] = Field(description="dataset name(s); a mapping gives mixture weights")
    eval_data: str | None = None
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    loss_on: Literal["completion", "all"] = Field("completion", description="completion = prompt tokens masked")
    merge: bool = Field(False, description="also write a merged model (adapter folded into the base)")
    train: dict[str, Any] = Field(default_factory=dict, description="TRL SFTConfig fields, by their TRL names")
    launch: LaunchSpec = Field(default_factory=LaunchSpec)
    allow_cpu_qlora: bool = Field(False, description="train QLoRA on CPU even if the gradient check disagrees")


class RewardStage(_StageBase):
    """A reward model (sequence classifier, one score) on preference pairs, via TRL's RewardTrainer.

    Its input defaults to the last policy stage (the SFT model, as in InstructGPT); it writes a merged
    reward model that `ppo`/`grpo`/`rloo` stages read."""

    type: Literal["reward"]
    data: str | list[str] | dict[str, float]
    eval_data: str | None = None
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    train: dict[str, Any] = Field(default_factory=dict, description="TRL RewardConfig fields, by their TRL names")
    launch: LaunchSpec = Field(default_factory=LaunchSpec)


class PreferenceStage(_StageBase):
    """Offline preference optimisation on pairs: `dpo` (TRL DPOTrainer), `kto`, `orpo`.

    With an adapter the reference model is the same weights with the adapter disabled (no second copy)."""

    type: Literal["dpo", "kto", "orpo"]
    data: str | list[str] | dict[str, float]
    eval_data: str | None = None
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    merge: bool = Field(False, description="also write a merged model (adapter folded into the base)")
    train: dict[str, Any] = Field(default_factory=dict, description="TRL DPOConfig/KTOConfig/ORPOConfig fields")
    launch: LaunchSpec = Field(default_factory=LaunchSpec)


class OnlineRLStage(_StageBase):
    """On-policy RL from prompts: `ppo` (align's own actor-critic), `grpo` and `rloo` (TRL's trainers).

    `reward` names a `reward` stage, or a Python function as `module:function` (imported only when named
    here); left out, the last earlier `reward` stage is used."""

    type: Literal["ppo", "grpo", "rloo"]
    data: str | list[str] | dict[str, float] = Field(description="prompts: any format with a prompt part")
    reward: str | None = Field(
        None, description="a reward stage name, `module:function`, or a reward model folder (./path)"
    )
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    merge: bool = Field(False, description="also write a merged model (adapter folded into the base)")
    train: dict[str, Any] = Field(
        default_factory=dict, description="ppo: align.ppo.PPOConfig fields; grpo/rloo: TRL GRPOConfig/RLOOConfig"
    )
    launch: LaunchSpec = Field(default_factory=LaunchSpec)


class EvalTask(_Strict):
    """Either perplexity on a recipe dataset (`data:`), or a task file (`task:` name in evaluation/tasks/ or path)."""

    type: Literal["perplexity"] = "perplexity"
    data: str | None = None
    task: str | None = None
    limit: int | None = Field(None, gt=0, description="task files: first N items (per subject for MMLU)")
    max_length: int = Field(512, gt=8, description="sliding window length in tokens")
    stride: int = Field(256, gt=0)
    max_samples: int | None = Field(None, gt=0)
    score: Literal["completion", "all"] = Field(
        "completion", description="perplexity: score response tokens only (completion), or every token (all)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> EvalTask:
        if (self.data is None) == (self.task is None):
            raise ValueError("set `data:` (perplexity on a recipe dataset) or `task:` (a task file), not both")
        return self


class EvalStage(_StageBase):
    type: Literal["eval"]
    targets: list[str] = Field(
        default_factory=list, description="`base` and/or stage names; empty = base and the previous stage"
    )
    tasks: list[EvalTask] = Field(min_length=1)
    batch_size: int = Field(8, gt=0)
    launch: LaunchSpec = Field(
        default_factory=lambda: LaunchSpec(mode="python"),
        description="one plain process by default; with accelerate and N processes the items are sharded "
        "across them (whole batches per rank, so the result equals one process's)",
    )


AnyStage = SFTStage | RewardStage | PreferenceStage | OnlineRLStage | EvalStage
Stage = Annotated[AnyStage, Field(discriminator="type")]
# the one explicit list of stage types (see stages/__init__.py)
STAGE_TYPES = ("sft", "reward", "dpo", "kto", "orpo", "ppo", "grpo", "rloo", "eval")
POLICY_TYPES = ("sft", "dpo", "kto", "orpo", "ppo", "grpo", "rloo")  # their output is the next stage's model


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    description: str = ""
    model: ModelSpec
    output_dir: str = Field("runs", description="run folders go to <output_dir>/<name>/")
    seed: int = 42
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    stages: list[Stage] = Field(min_length=1)

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return {"name_or_path": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _links(self) -> Recipe:
        """Cross-field checks: unique names, known datasets, `from` pointing backwards."""
        problems: list[tuple[str, str]] = []
        seen: list[str] = []
        for i, st in enumerate(self.stages):
            where = f"stages[{i}]({st.name})"
            if st.name in seen or st.name == "base":
                problems.append((f"{where}.name", f"`{st.name}` is used twice or reserved; names must be unique"))
            if st.source is not None and st.source != "base" and st.source not in seen:
                problems.append(
                    (
                        f"{where}.from",
                        f"`{st.source}` is not an earlier stage{did_you_mean(st.source, seen + ['base'])}",
                    )
                )
            for ref, field in _dataset_refs(st):
                if ref not in self.datasets:
                    hint = did_you_mean(ref, self.datasets) or f"; defined: {', '.join(self.datasets) or 'none'}"
                    problems.append((f"{where}.{field}", f"unknown dataset `{ref}`{hint}"))
            if st.source is not None and st.source in seen and self.stage(st.source).type not in POLICY_TYPES:
                problems.append(
                    (f"{where}.from", f"`{st.source}` is a `{self.stage(st.source).type}` stage, not a policy model")
                )
            if isinstance(st, EvalStage):
                for t in st.targets:
                    if t != "base" and t not in seen:
                        problems.append(
                            (f"{where}.targets", f"`{t}` is not an earlier stage{did_you_mean(t, seen + ['base'])}")
                        )
                    elif t != "base" and self.stage(t).type not in POLICY_TYPES:
                        problems.append((f"{where}.targets", f"`{t}` is a `{self.stage(t).type}` stage, not a policy"))
            if isinstance(st, OnlineRLStage):
                problems += self._reward_link(st, where, seen)
            seen.append(st.name)
        if problems:
            raise RecipeError(problems)
        return self

    def _reward_link(self, st: OnlineRLStage, where: str, seen: list[str]) -> list[tuple[str, str]]:
        rewards = [n for n in seen if self.stage(n).type == "reward"]
        if st.reward is None:
            if not rewards:
                return [
                    (
                        f"{where}.reward",
                        f"a `{st.type}` stage needs a reward: add a `type: reward` stage before it, or set "
                        "`reward: module:function`",
                    )
                ]
            return []
        kind = reward_kind(st.reward)
        if kind == "path":
            return []  # an existing reward model folder: checked at plan time (files, tokenizer)
        if kind == "function":
            mod, _, fn = st.reward.partition(":")
            if not mod or not fn.isidentifier():
                return [(f"{where}.reward", f"`{st.reward}` is not of the form `module:function`")]
            return []
        if st.reward not in rewards:
            what = f"is a `{self.stage(st.reward).type}` stage" if st.reward in seen else "is not an earlier stage"
            hint = did_you_mean(st.reward, rewards) or f"; earlier reward stages: {', '.join(rewards) or 'none'}"
            return [(f"{where}.reward", f"`{st.reward}` {what}, not a reward model{hint}")]
        return []

    def reward_source(self, st: OnlineRLStage) -> str:
        """The reward stage name, or `module:function`, an online RL stage reads (after `_links` passed)."""
        if st.reward is not None:
            return st.reward
        index = self.stages.index(st)
        return next(s.name for s in reversed(self.stages[:index]) if s.type == "reward")

    def stage(self, name: str) -> AnyStage:
        for st in self.stages:
            if st.name == name:
                return st
        raise RecipeError(f"no stage named `{name}`{did_you_mean(name, [s.name for s in self.stages])}", "stage")


def reward_kind(ref: str) -> Literal["stage", "function", "path"]:
    """`reward:` names a reward stage, a `module:function`, or a reward model folder (a path)."""
    if ref.startswith((".", "/", "~")):
        return "path"
    return "function" if ":" in ref else "stage"


def _dataset_refs(st: AnyStage) -> list[tuple[str, str]]:
    if isinstance(st, OnlineRLStage):
        names = [st.data] if isinstance(st.data, str) else list(st.data)
        return [(n, "data") for n in names]
    if not isinstance(st, EvalStage):
        names = [st.data] if isinstance(st.data, str) else list(st.data)
        refs = [(n, "data") for n in names]
        return refs + ([(st.eval_data, "eval_data")] if st.eval_data else [])
    return [(t.data, f"tasks[{j}].data") for j, t in enumerate(st.tasks) if t.data]


# ---------------------------------------------------------------- loading, extends, overrides


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}", "recipe")
    try:
        data = load_yaml_text(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"not valid YAML: {e}", str(path)) from None
    if not isinstance(data, dict):
        raise RecipeError("a recipe must be a mapping of keys (name, model, datasets, stages)", str(path))
    return data


def deep_merge(base: Any, over: Any) -> Any:
    """Merge `over` into `base`: mappings recursively; lists of named mappings by `name`."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = deep_merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if _named_list(base) and _named_list(over):
        out = [copy.deepcopy(x) for x in base]
        index = {x["name"]: i for i, x in enumerate(out)}
        for item in over:
            if item["name"] in index:
                out[index[item["name"]]] = deep_merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(over)


def _named_list(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(i, dict) and "name" in i for i in x)


def _resolve_extends(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        raise RecipeError(f"`extends` loops: {' -> '.join(p.name for p in chain + (path,))}", "extends")
    data = _load_yaml(path)
    parent = data.pop("extends", None)
    _absolutize_paths(data, path.parent)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError("must be a path to another recipe", "extends")
    parent_path = (path.parent / parent).resolve()
    if not parent_path.is_file():
        raise RecipeError(f"recipe to extend not found: {parent_path}", "extends")
    return deep_merge(_resolve_extends(parent_path, chain + (path,)), data)


def _absolutize_paths(data: dict[str, Any], root: Path) -> None:
    """Relative dataset paths are relative to the recipe file that names them, so `extends` works anywhere."""
    for spec in (data.get("datasets") or {}).values():
        if isinstance(spec, dict):
            for key in ("path", "eval_path"):
                p = spec.get(key)
                if isinstance(p, str) and (p.startswith(".") or "/" in p) and not Path(p).is_absolute():
                    cand = root / p
                    if cand.exists() or p.startswith("."):
                        spec[key] = str(cand.resolve())
    for st in data.get("stages") or []:
        if isinstance(st, dict) and isinstance(st.get("reward"), str) and st["reward"].startswith("."):
            st["reward"] = str((root / st["reward"]).resolve())
    model = data.get("model")
    if isinstance(model, str) and model.startswith("."):
        data["model"] = str((root / model).resolve())
    elif isinstance(model, dict):
        for key in ("name_or_path", "chat_template"):
            p = model.get(key)
            if isinstance(p, str) and p.startswith("."):
                model[key] = str((root / p).resolve())


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides. Values are YAML; list items may be named (`stages.sft.train.max_steps=5`).

    The tree is copied node by node first: a YAML anchor/alias shares one node between several places, and
    an override of one place must not change the others (`copy.deepcopy` would keep them shared)."""
    data = _unshared(data)
    for ov in overrides:
        if "=" not in ov:
            raise RecipeError(f"`{ov}` is not of the form key.path=value", "override")
        key, raw = ov.split("=", 1)
        try:
            value = load_yaml_text(raw)
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node: Any = data
        for j, part in enumerate(parts):
            last = j == len(parts) - 1
            if isinstance(node, list):
                idx = _list_index(node, part, key)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if part == "model" and isinstance(node.get(part), str):
                        node[part] = {"name_or_path": node[part]}
                    node = node.setdefault(part, {})
            else:
                raise RecipeError(f"`{'.'.join(parts[:j])}` is a value, not a section", f"override {key}")
    return data


def _unshared(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _unshared(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unshared(v) for v in x]
    return copy.copy(x)


def _list_index(node: list[Any], part: str, key: str) -> int:
    if part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
        return int(part)
    names = [x.get("name") for x in node if isinstance(x, dict)]
    if part in names:
        return names.index(part)
    raise RecipeError(f"no list item `{part}`{did_you_mean(part, [n for n in names if n])}", f"override {key}")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, compose, override and validate a recipe; every problem is reported at once."""
    data = apply_overrides(_resolve_extends(Path(path)), overrides or [])
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_explain(e, data) + _raw_train_problems(data)) from None
    from align.stages import check_stage_args  # late import: pulls in TRL's config classes

    problems = []
    for i, st in enumerate(recipe.stages):
        problems += check_stage_args(st, f"stages[{i}]({st.name})")
    if problems:
        raise RecipeError(problems)
    return recipe


def _raw_train_problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    """Trainer-argument problems too, when the schema already failed, so every error is reported at once."""
    from align.stages import module

    out = []
    for i, st in enumerate(data.get("stages") or []):
        if isinstance(st, dict) and st.get("type") in STAGE_TYPES and isinstance(st.get("train"), dict):
            cls = getattr(module(st["type"]), "TRAINER_CONFIG", None)
            if isinstance(cls, dict):  # one module serving several stage types
                cls = cls.get(st["type"])
            if cls is not None:
                from align.trl_compat import check_trainer_args

                out += check_trainer_args(st["train"], cls, f"stages[{i}]({st.get('name')}).train")
    return out


def _explain(err: ValidationError, data: dict[str, Any]) -> list[tuple[str, str]]:
    """Turn pydantic's errors into (path, message) pairs with hints for typos."""
    out: list[tuple[str, str]] = []
    for e in err.errors():
        loc = list(e["loc"])
        if e["type"] == "value_error" and isinstance(e.get("ctx", {}).get("error"), RecipeError):
            out += e["ctx"]["error"].problems
            continue
        # drop pydantic's discriminator tag from the location (stages.0.sft.train -> stages[0].train)
        clean: list[Any] = []
        node: Any = data
        for part in loc:
            if isinstance(node, list) and isinstance(part, int) and part < len(node):
                name = node[part].get("name") if isinstance(node[part], dict) else None
                clean.append(f"[{part}]({name})" if name else f"[{part}]")
                node = node[part]
                continue
            if isinstance(node, dict) and part not in node and part in STAGE_TYPES:
                continue
            clean.append(f".{part}")
            node = node.get(part) if isinstance(node, dict) else None
        path = "".join(str(c) for c in clean).lstrip(".")
        kind = e["type"]
        if kind == "extra_forbidden":
            owner = _owner_fields(loc[:-1], data)
            out.append((path, f"unknown key{did_you_mean(loc[-1], owner)}; valid keys: {', '.join(owner)}"))
        elif kind == "union_tag_invalid":
            got = e.get("ctx", {}).get("tag")
            out.append(
                (
                    path + ".type",
                    f"unknown stage type `{got}`{did_you_mean(got, STAGE_TYPES)}; known: {', '.join(STAGE_TYPES)}",
                )
            )
        elif kind == "union_tag_not_found":
            out.append((path + ".type", f"missing; one of: {', '.join(STAGE_TYPES)}"))
        elif kind == "missing":
            out.append((path, "required field is missing"))
        else:
            got = e.get("input")
            shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
            out.append((path, f"{e['msg']}{shown}"))
    return out


def _owner_fields(loc: list[Any], data: dict[str, Any]) -> list[str]:
    """The valid field names at a pydantic error location, to suggest the closest one for a typo."""
    t: Any = Recipe
    for part in loc:
        t = _step(t, part)
    return [f.alias or n for n, f in t.model_fields.items()] if _is_model(t) else []


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _step(t: Any, part: Any) -> Any:
    """Follow one location part through the schema's annotations (models, lists, dicts, unions)."""
    while get_origin(t) is Annotated:
        t = get_args(t)[0]
    if _is_model(t):
        field = t.model_fields.get(part)
        return field.annotation if field else t
    origin, args = get_origin(t), get_args(t)
    if origin is list:
        return args[0]
    if origin is dict:
        return args[1]
    members = [a for a in args if _is_model(a) or get_origin(a) is not None]
    for m in members:  # a discriminated union: the location names the tag
        if _is_model(m) and "type" in m.model_fields and part in get_args(m.model_fields["type"].annotation):
            return m
    return _step(members[0], part) if members else t
