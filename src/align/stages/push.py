"""Push stage: ship one stage's result to a model hub (or a folder / fsspec URL) with a model card.

config -> export -> card -> push -> metrics. What is pushed: the adapter of a policy stage (default), its
merged model (`what: merged`), or a reward stage's model (`what: reward`); the card (README.md) carries the
run's evaluation of that model, the stage chain, the recipe as run, versions and the report's plots. The
token comes from HF_TOKEN or the hub login, never from a recipe; it is checked (reachable, accepted, allowed
to write) before any stage of the run trains, and again before the upload.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, StrictBool, model_validator

from align import distributed
from align.errors import RecipeError
from align.memory import Workload
from align.models import hub_id
from align.rundir import Plan, StagePlan, read_stage_json, write_common, write_metrics
from align.spec import LaunchSpec, StageSpec
from align.stages.base import Problem, Record, Stage
from align.stages.reward import PUSH_WHAT

WHAT = ("adapter", "merged", PUSH_WHAT)


class PushSpec(StageSpec):
    type: Literal["push"]
    what: Literal["adapter", "merged", PUSH_WHAT] = Field(  # type: ignore[valid-type]
        "adapter", description="adapter (peft), merged (the adapter folded into the base) or reward (a reward model)"
    )
    repo_id: str | None = Field(None, description="hub repository ORG/NAME")
    to: str | None = Field(None, description="instead of the hub: a folder, file:///... or an fsspec URL (s3://...)")
    private: StrictBool = Field(False, description="create the hub repository private")
    revision: str | None = Field(None, description="branch to push to (created if absent); default main")
    dry_run: StrictBool = Field(False, description="write the exact folder that would be pushed, push nothing")
    base_model: str | None = Field(None, description="hub id of the base, when the recipe's model is a local folder")
    launch: LaunchSpec = Field(default_factory=lambda: LaunchSpec(mode="python"), description="one plain process")

    @model_validator(mode="after")
    def _one_target(self) -> PushSpec:
        if (self.repo_id is None) == (self.to is None):
            raise ValueError("set `repo_id: ORG/NAME` (the hub) or `to:` (a folder or URL), not both")
        return self


def repo_id_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` is not a hub repository id (ORG/NAME, the hub's own rules), or None."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        return f"`{repo_id}` is not ORG/NAME"
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        return f"`{repo_id}` is not a valid hub repository id: {str(e).split(':')[0]}"
    return None


class Push(Stage):
    name = "push"
    spec = PushSpec
    memory = Workload(training=False)
    follows_cli_launch = False
    source_must_be_policy = False  # `what: reward` pushes a reward stage

    def check_args(self, spec: PushSpec, where: str) -> list[Problem]:
        why = repo_id_problem(spec.repo_id) if spec.repo_id is not None else None
        return [(f"{where}.repo_id", why)] if why else []

    def links(self, recipe: Any, spec: PushSpec, where: str, kind: Any) -> list[Problem]:
        index = recipe.stages.index(spec)
        if spec.source is None or spec.source == "base":
            if spec.source == "base" or not any(kind(s).produces_policy for s in recipe.stages[:index]):
                return [(f"{where}.from", "name the stage to push (`from: STAGE`); the base model is not pushed")]
            return []
        src = kind(recipe.stage(spec.source))
        if spec.what == PUSH_WHAT and not src.produces_reward:
            return [(f"{where}.what", f"`what: {PUSH_WHAT}` pushes a reward stage; `{spec.source}` is not one")]
        if spec.what != PUSH_WHAT and not src.produces_policy:
            return [(f"{where}.from", f"`{spec.source}` is a `{src.name}` stage: push it with `what: {PUSH_WHAT}`")]
        return []

    def check(self, plan: Plan, sp: StagePlan) -> list[Problem]:
        spec = sp.stage
        if spec.what == "adapter" and not (spec.base_model or hub_id(plan.base)):
            return [
                (
                    f"{sp.where}.base_model",
                    f"the recipe's model `{plan.base.ref}` is a local folder: a pushed adapter must name its base on "
                    "the hub; set `base_model: ORG/NAME`, or push `what: merged`",
                )
            ]
        return []

    def preflight(self, plan: Plan, sp: StagePlan) -> None:
        """Before any stage of the run trains: the target is reachable and the token may write there."""
        from align import hub

        spec = sp.stage
        if not spec.dry_run:
            hub.preflight(target(spec), None)

    def resolved_config(self, plan: Plan, sp: StagePlan) -> dict[str, Any]:
        return {"target": target(sp.stage), "base_model": sp.stage.base_model or hub_id(plan.base)}

    def batch(self, plan: Plan, sp: StagePlan) -> tuple[int, int]:
        return 1, 1

    def run(self, plan: Plan, sp: StagePlan, out: Path) -> Record | None:
        if not distributed.is_main():
            return None
        spec = sp.stage
        write_common(sp, plan, out, {"stage": spec.model_dump(mode="json", by_alias=True)})
        src = sp.inputs[0]
        message = f"align: {spec.what} of stage `{src}` of recipe `{plan.recipe.name}` ({plan.recipe_path.name})"
        result = ship(
            plan.run_dir,
            src,
            spec.what,
            target(spec),
            out / "pushed",
            base_hub_id=spec.base_model or hub_id(plan.base),
            commit_message=message,
            private=spec.private,
            revision=spec.revision,
            dry_run=spec.dry_run,
        )
        write_metrics(out, result)
        return {"type": self.name, "output": {"kind": "push", "path": "pushed"}, "metrics": result}

    def headline(self, m: dict[str, Any]) -> str:
        return f"{m.get('files')} files -> {m.get('url')}" + (" (dry run)" if m.get("dry_run") else "")

    def writes(self, spec: PushSpec) -> str:
        return f"pushed/ ({spec.what} + README.md card) -> {target(spec)}"


def target(spec: PushSpec) -> str:
    return spec.repo_id if spec.repo_id is not None else str(spec.to)


def ship(
    run_dir: Path,
    stage: str,
    what: str,
    to: str,
    dest: Path,
    *,
    base_hub_id: str | None,
    commit_message: str,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Export a done stage's artifact to `dest` with its model card (README.md) and the report's plots, then push
    it (unless `dry_run`). Used by the push stage and `align push`. Nothing is uploaded when a check fails."""
    from align import hub
    from align.card import build_card
    from align.report import write_report

    stage_dir = run_dir / stage
    info = read_stage_json(stage_dir)
    if info is None:
        raise RecipeError(f"stage `{stage}` is not done ({stage_dir}); run the recipe first", "stage")
    if not dry_run and hub.is_hub_target(to):
        hub.preflight(to, None)  # before the (possibly long) merge
    if dest.exists():
        shutil.rmtree(dest)
    folder = hub.export(stage_dir, what, dest, base_hub_id=base_hub_id)
    write_report(run_dir)
    repo_id = to.removeprefix("hf://") if hub.is_hub_target(to) else None
    card = build_card(run_dir, stage, what=what, repo_id=repo_id, base_model=base_hub_id)
    (folder / "README.md").write_text(str(card))
    plots = run_dir / "report"
    if plots.is_dir():
        shutil.copytree(plots, folder / "report", dirs_exist_ok=True)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    result = {
        "what": what,
        "stage": stage,
        "target": to,
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "dry_run": dry_run,
        "revision": revision,
    }
    if dry_run:
        print(f"[align] dry run: {len(files)} files for {to} in {folder}", flush=True)
        return {**result, "url": str(folder)}
    url = hub.push(folder, to, private=private, revision=revision, commit_message=commit_message)
    return {**result, "url": url}
