"""On-policy RL stages on TRL's trainers: `grpo` (GRPOTrainer) and `rloo` (RLOOTrainer); the reward they share
with `ppo` (align.stages.ppo).

config -> data -> model -> trainer -> train -> save -> metrics (the skeleton in `align.stages._trl`).

Prompts come from any dataset with a prompt part; the policy is the previous policy stage's output with a
new adapter. The reward is the last reward stage's model (loaded as a sequence classifier), a reward model
folder, or a Python function named `module:function` in the recipe, imported only when the stage runs (the
recipe's folder is searched first); it is called as TRL calls reward functions:
`f(prompts=..., completions=..., **columns) -> list[float]`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, StrictBool

from align.data import PROMPT_FORMATS, file_hash, to_prompts
from align.errors import RecipeError, did_you_mean
from align.memory import StageMemoryInput, Workload
from align.models import read_json_mapping, torch_dtype
from align.rundir import Plan, StagePlan, input_artifact
from align.spec import RecipeSpec, StageSpec, TrainSpec, as_number
from align.stages._trl import TRAIN_DEFAULTS, Trained, TRLStage
from align.stages.base import Default, Problem, Stage, fmt
from align.trl_compat import GRPOConfig, RLOOConfig

TRL_REWARD_KEY = "reward"  # what TRL's GRPO/RLOO trainers log the mean reward as


class OnlineSpec(TrainSpec):
    """On-policy RL from prompts. `reward` names a reward stage, a reward model folder (./path), or a Python
    function as `module:function`; left out, the last earlier reward stage is used."""

    data: str | list[str] | dict[str, float] = Field(description="prompts: any format with a prompt part")
    reward: str | None = Field(
        None, description="a reward stage name, `module:function`, or a reward model folder (./path)"
    )
    merge: StrictBool = Field(False, description="also write a merged model (adapter folded into the base)")
    train: dict[str, Any] = Field(default_factory=dict, description="the trainer's config fields")


# ---------------------------------------------------------------- the reward: a reward stage, a folder or a function


def reward_kind(ref: str) -> Literal["stage", "function", "path"]:
    """`reward:` names a reward stage, a `module:function`, or a reward model folder (a path)."""
    if ref.startswith((".", "/", "~")):
        return "path"
    return "function" if ":" in ref else "stage"


def reward_stages(recipe: RecipeSpec, before: StageSpec, kind: Callable[[StageSpec], Stage]) -> list[str]:
    index = recipe.stages.index(before)
    return [s.name for s in recipe.stages[:index] if kind(s).produces_reward]


def reward_source(recipe: RecipeSpec, spec: OnlineSpec, kind: Callable[[StageSpec], Stage]) -> str:
    """The reward an online RL stage reads: its `reward:`, else the last earlier reward stage (links checked)."""
    return spec.reward if spec.reward is not None else reward_stages(recipe, spec, kind)[-1]


def reward_ref(sp: StagePlan) -> str:
    """The same, once planned: the default reward stage is the stage's second input."""
    return sp.stage.reward if sp.stage.reward is not None else sp.inputs[1]


def reward_is_function(sp: StagePlan) -> bool:
    return reward_kind(reward_ref(sp)) == "function"


class OnlineRL(TRLStage):
    """What grpo, rloo and ppo share: prompts as data, a reward, and the reward as an input of the stage."""

    unchanged_is_failure = False  # equal rewards within every group: zero advantage, weights unchanged by design

    formats = PROMPT_FORMATS
    produces_policy = True
    path_fields = ("reward",)  # `reward: ./folder` is a reward model folder beside the recipe
    memory = Workload(generates=True)
    defaults = (*TRAIN_DEFAULTS, Default("learning_rate", 1e-5, "on-policy updates are noisy; small steps", "adapter"))

    def links(
        self, recipe: RecipeSpec, spec: OnlineSpec, where: str, kind: Callable[[StageSpec], Stage]
    ) -> list[Problem]:
        rewards = reward_stages(recipe, spec, kind)
        if spec.reward is None:
            if rewards:
                return []
            return [
                (
                    f"{where}.reward",
                    f"a `{spec.type}` stage needs a reward: add a `type: reward` stage before it, or set "
                    "`reward: module:function`",
                )
            ]
        ref = spec.reward
        if reward_kind(ref) == "path":
            return []  # an existing reward model folder: checked at plan time (files, tokenizer)
        if reward_kind(ref) == "function":
            mod, _, fn = ref.partition(":")
            return (
                []
                if mod and fn.isidentifier()
                else [(f"{where}.reward", f"`{ref}` is not of the form `module:function`")]
            )
        if ref in rewards:
            return []
        earlier = [s.name for s in recipe.stages[: recipe.stages.index(spec)]]
        what = f"is a `{recipe.stage(ref).type}` stage" if ref in earlier else "is not an earlier stage"
        hint = did_you_mean(ref, rewards) or f"; earlier reward stages: {', '.join(rewards) or 'none'}"
        return [(f"{where}.reward", f"`{ref}` {what}, not a reward model{hint}")]

    def inputs(
        self, recipe: RecipeSpec, spec: OnlineSpec, default_source: str, kind: Callable[[StageSpec], Stage]
    ) -> list[str]:
        inputs = [spec.source or default_source]
        ref = reward_source(recipe, spec, kind)
        if reward_kind(ref) == "stage":
            inputs.append(ref)  # the reward model is an input too: retraining it re-runs this stage
        return inputs

    def check_fields(self, spec: Any, where: str) -> list[Problem]:
        """GRPO/RLOO compare several completions of one prompt: at least 2 (TRL divides by the count first)."""
        problems = []
        n, beta = as_number(spec.train.get("num_generations")), as_number(spec.train.get("beta"))
        if n is not None and n < 2:
            problems.append(
                (
                    f"{where}.train.num_generations",
                    f"must be at least 2 (got {spec.train['num_generations']!r}): the advantage compares "
                    "completions of the same prompt",
                )
            )
        if beta is not None and beta < 0:
            problems.append(
                (f"{where}.train.beta", f"the KL coefficient must be 0 or more (got {spec.train['beta']!r})")
            )
        return problems

    def convert(self, ds: Any, fmt: str, *, chat: bool, spec: Any, tok: Any) -> Any:
        return to_prompts(ds, fmt, chat=chat)

    def check_inputs(self, plan: Plan, sp: StagePlan, formats: dict[str, str]) -> list[Problem]:
        return check_reward(plan, sp, same_tokenizer=False)

    def resolved_config(self, plan: Plan, sp: StagePlan) -> dict[str, Any]:
        return {**self.train_args(plan, sp), **reward_record(plan, sp)}

    # TRL's GRPOTrainer and RLOOTrainer sample one batch of completions and train on it for
    # `steps_per_generation * num_iterations` micro-steps, counting them in `_step`; neither is in TRL's checkpoint.
    # Resumed from a checkpoint inside such a block, TRL would start `_step` at 0 and sample the batch again with the
    # checkpoint's RNG state instead of the one the first sampling had: other completions, other weights. Carried
    # in the checkpoint, the resumed run trains on the rest of the block, then samples the next one from the RNG
    # state the uninterrupted run had there.
    checkpointed = (*TRLStage.checkpointed, "_step", "_buffered_inputs")

    def trainer_kwargs(self, plan: Plan, sp: StagePlan, eval_ds: Any) -> dict[str, Any]:
        if reward_is_function(sp):
            return {"reward_funcs": load_function(plan, sp), "reward_processing_classes": None}
        model, tok = load_reward_model(plan, sp)
        return {"reward_funcs": model, "reward_processing_classes": tok}

    def stage_metrics(self, plan: Plan, sp: StagePlan, t: Trained) -> dict[str, Any]:
        """The reward curve from the trainer's log."""
        history = t.trainer.state.log_history
        rewards = [h[TRL_REWARD_KEY] for h in history if TRL_REWARD_KEY in h]
        if not rewards:
            return {}
        k = max(1, min(5, len(rewards) // 2))
        return {
            "reward_first": sum(rewards[:k]) / k,
            "reward_last": sum(rewards[-k:]) / k,
            "kl_last": next((h["kl"] for h in reversed(history) if "kl" in h), None),
        }

    def memory_input(self, plan: Plan, sp: StagePlan, common: dict[str, Any]) -> StageMemoryInput:
        resolved = self.resolved_config(plan, sp)
        fields = self.trainer_config.__dataclass_fields__

        def get(key: str) -> Any:
            return resolved[key] if key in resolved else (fields[key].default if key in fields else None)

        ac = get("activation_checkpointing")
        return StageMemoryInput(
            self.memory,
            **common,
            seq_len=int(get("max_prompt_length") or 512),
            gen_tokens=int(get("max_completion_length") or 256),
            num_generations=int(get("num_generations") or 1),
            activation_checkpointing=bool(ac if ac is not None else get("gradient_checkpointing")),
            reward_model=resolved["reward"].get("function") is None,
        )

    def describe_inputs(self, sp: StagePlan) -> str:
        return f"{sp.inputs[0]} + reward {reward_ref(sp)}"

    def plan_fields(self, sp: StagePlan) -> dict[str, Any]:
        return {"reward": reward_ref(sp)}

    def headline(self, m: dict[str, Any]) -> str:
        reward = f"reward {fmt(m, 'reward_first')} -> {fmt(m, 'reward_last')}"
        return f"{m.get('steps')} steps, {reward}, KL {fmt(m, 'kl_last')}"


class GRPOSpec(OnlineSpec):
    type: Literal["grpo"]


class RLOOSpec(OnlineSpec):
    type: Literal["rloo"]


class GRPO(OnlineRL):
    name = "grpo"
    spec = GRPOSpec
    trainer_config = GRPOConfig
    trainer_name = "GRPOTrainer"

    def launch_problems(self, info: Any, where: str) -> list[Problem]:
        return fsdp_refused(info, self.name, where)


class RLOO(OnlineRL):
    name = "rloo"
    spec = RLOOSpec
    trainer_config = RLOOConfig
    trainer_name = "RLOOTrainer"

    def launch_problems(self, info: Any, where: str) -> list[Problem]:
        return fsdp_refused(info, self.name, where)


def fsdp_refused(info: Any, stage_type: str, where: str) -> list[Problem]:
    if not info.fsdp:
        return []
    field = f"{where}.launch.accelerate_config"
    return [(field, f"{stage_type} under FSDP is not supported by align; use deepspeed_zero2/3 or multi_gpu")]


# ---------------------------------------------------------------- the reward, loaded


def function_file(plan: Plan, sp: StagePlan) -> Path | None:
    """Where `module:function` lives, found without running any of its code: `find_spec` of a dotted name would
    import (execute) its parent packages, so only the top-level name is looked up and the rest is walked on disk.
    The recipe's folder is searched first."""
    return locate_module(reward_ref(sp).partition(":")[0], plan.recipe_path.parent)


def locate_module(mod: str, first: Path) -> Path | None:
    top, *rest = mod.split(".")
    if not top.isidentifier() or not all(p.isidentifier() for p in rest):
        return None
    if (first / f"{top}.py").is_file() and not rest:
        return first / f"{top}.py"
    if (first / top).is_dir():
        places = [first / top]
    else:
        try:
            spec = importlib.util.find_spec(top)  # a top-level name: found, not executed
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        if not rest:
            return Path(spec.origin) if spec.origin and spec.origin not in ("built-in", "frozen") else None
        places = [Path(p) for p in (spec.submodule_search_locations or [])]
    for part in rest[:-1]:
        places = [p / part for p in places if (p / part).is_dir()]
    for place in places:
        if not rest:
            if (place / "__init__.py").is_file():
                return place / "__init__.py"
            continue
        for candidate in (place / f"{rest[-1]}.py", place / rest[-1] / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def defines(source: Path, name: str) -> bool | None:
    """The module file defines (or imports) `name` at its top level; None when it cannot be read as Python."""
    import ast

    try:
        tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == name:
            return True
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        if isinstance(node, ast.Import | ast.ImportFrom) and any(
            (a.asname or a.name.split(".")[0]) == name or a.name == "*" for a in node.names
        ):
            return True
    return False


def load_function(plan: Plan, sp: StagePlan) -> Any:
    ref = reward_ref(sp)
    mod, _, name = ref.partition(":")
    with _recipe_on_path(plan):
        fn = getattr(importlib.import_module(mod), name, None)
    if not callable(fn):
        raise RecipeError(f"`{ref}`: module `{mod}` has no function `{name}`", f"stages.{sp.name}.reward")
    return fn


class _recipe_on_path:
    def __init__(self, plan: Plan):
        self.dir = str(plan.recipe_path.parent)

    def __enter__(self) -> None:
        sys.path.insert(0, self.dir)

    def __exit__(self, *exc: Any) -> None:
        if self.dir in sys.path:
            sys.path.remove(self.dir)


def check_reward(plan: Plan, sp: StagePlan, *, same_tokenizer: bool) -> list[Problem]:
    """Plan-time: the function's module exists; a reward model folder exists, is a one-score classifier and
    (where the stage needs it) uses the policy's tokenizer. Reward stages share the recipe's base tokenizer."""
    where = sp.where
    ref = reward_ref(sp)
    kind = reward_kind(ref)
    if kind == "function":
        mod, _, name = ref.partition(":")
        source = function_file(plan, sp)
        if source is None:
            return [(f"{where}.reward", f"module `{mod}` not found (looked in {plan.recipe_path.parent} and sys.path)")]
        if defines(source, name) is False:
            return [(f"{where}.reward", f"`{mod}` ({source}) has no top-level function `{name}`")]
        return []
    if kind == "stage":
        return []
    folder = Path(ref).expanduser()
    if not folder.exists():
        return [
            (
                f"{where}.reward",
                f"{folder} does not exist: name a reward stage, a reward model folder, or `module:function`",
            )
        ]
    if not (folder / "config.json").is_file():
        return [(f"{where}.reward", f"{folder} is not a model folder (no config.json)")]
    try:
        cfg = read_json_mapping(folder / "config.json", f"{where}.reward")
    except RecipeError as e:
        return e.problems
    if not any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or []):
        return [
            (f"{where}.reward", f"{folder} is not a sequence classifier (architectures: {cfg.get('architectures')})")
        ]
    if same_tokenizer and plan.base.path is not None and not same_vocab(folder, plan.base.path):
        return [
            (
                f"{where}.reward",
                f"the reward model's tokenizer ({folder}) differs from the policy's; the value head starts from the "
                "reward model and reads the policy's tokens, so they must share one. Train a reward stage instead",
            )
        ]
    return []


def same_vocab(a: Path, b: Path) -> bool:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(a).get_vocab() == AutoTokenizer.from_pretrained(b).get_vocab()


def reward_identity(plan: Plan, sp: StagePlan) -> dict[str, Any]:
    """For the fingerprint: a function's source file hash (a reward stage is an input, hashed by the pipeline)."""
    ref = reward_ref(sp)
    if reward_kind(ref) == "stage":
        return {"stage": ref}
    if reward_kind(ref) == "path":
        folder = Path(ref).expanduser()  # not a folder: `check_reward` says so
        files = sorted(f for f in folder.iterdir() if f.suffix in {".json", ".safetensors"}) if folder.is_dir() else []
        return {"reward_model_files": {f.name: file_hash(f) for f in files}}  # content, not where it lies
    f = function_file(plan, sp)
    return {"function": ref, "sha256": file_hash(f) if f else None}


def reward_record(plan: Plan, sp: StagePlan) -> dict[str, Any]:
    """The reward's part of a stage's resolved config (and so of its fingerprint)."""
    return {"reward": reward_identity(plan, sp)}


def load_reward_model(plan: Plan, sp: StagePlan) -> tuple[Any, Any]:
    """(classifier, its tokenizer) from the reward stage's folder or a reward model folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    ref = reward_ref(sp)
    art = {"path": ref} if reward_kind(ref) == "path" else input_artifact(plan, ref)
    model = AutoModelForSequenceClassification.from_pretrained(
        art["path"], dtype=torch_dtype(plan.recipe.model.dtype), use_safetensors=True
    ).eval()
    tok = AutoTokenizer.from_pretrained(art["path"])
    return model, tok
