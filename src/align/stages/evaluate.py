"""Eval stage: score each target (the base model and/or earlier stages' outputs) on the recipe's tasks.

config -> data -> model -> score -> save -> metrics. Targets default to the base model and the
previous policy stage, so a recipe ends with a before/after comparison.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from align import distributed
from align.console import orchestrated, show_bars, verbose
from align.data import TEXT_FORMATS, check_format, is_local, load_rows, peek_rows, scan_dataset, texts_of
from align.errors import RecipeError, did_you_mean
from align.memory import StageMemoryInput, Workload
from align.models import plan_tokenizer
from align.resources import data_root
from align.rundir import Plan, StagePlan, input_artifact, read_stage_json, write_common
from align.spec import LaunchSpec, RecipeSpec, StageSpec, Strict
from align.stages.base import Problem, Record, Stage


class EvalTask(Strict):
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


class EvalSpec(StageSpec):
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


class Eval(Stage):
    name = "eval"
    spec = EvalSpec
    formats = TEXT_FORMATS
    memory = Workload(training=False)
    evaluates = True
    follows_cli_launch = False  # `align run --accelerate-config` sets the training stages; eval keeps its `launch:`

    def preflight(self, plan: Plan, sp: StagePlan) -> None:
        """Hub task data is fetched (or found in align's cache) before any stage of the run trains."""
        for j, task in enumerate(sp.stage.tasks):
            if not task.task:
                continue
            spec = load_task_spec(task.task)
            if spec.from_hub:
                try:
                    spec.data_source(data_root(spec.data.path))
                except ValueError as e:
                    raise RecipeError(str(e), f"{sp.where}.tasks[{j}].task") from None

    def check_args(self, spec: EvalSpec, where: str) -> list[Problem]:
        return [
            (f"{where}.tasks[{j}].stride", f"stride {t.stride} is larger than max_length {t.max_length}")
            for j, t in enumerate(spec.tasks)
            if t.stride > t.max_length
        ]

    def dataset_refs(self, spec: EvalSpec) -> list[tuple[str, str]]:
        return [(t.data, f"tasks[{j}].data") for j, t in enumerate(spec.tasks) if t.data]

    def links(
        self, recipe: RecipeSpec, spec: EvalSpec, where: str, kind: Callable[[StageSpec], Stage]
    ) -> list[Problem]:
        earlier = recipe.stages[: recipe.stages.index(spec)]
        names = [s.name for s in earlier]
        problems = []
        for t in spec.targets:
            if t != "base" and t not in names:
                problems.append(
                    (f"{where}.targets", f"`{t}` is not an earlier stage{did_you_mean(t, names + ['base'])}")
                )
            elif t != "base" and not kind(recipe.stage(t)).produces_policy:
                problems.append((f"{where}.targets", f"`{t}` is a `{recipe.stage(t).type}` stage, not a policy"))
        return problems

    def inputs(
        self, recipe: RecipeSpec, spec: EvalSpec, default_source: str, kind: Callable[[StageSpec], Stage]
    ) -> list[str]:
        if spec.targets:
            return list(spec.targets)
        return ["base"] if default_source == "base" else ["base", default_source]

    def check(self, plan: Plan, sp: StagePlan) -> list[Problem]:
        return check(plan, sp)

    def resolved_config(self, plan: Plan, sp: StagePlan) -> dict[str, Any]:
        return {}

    def batch(self, plan: Plan, sp: StagePlan) -> tuple[int, int]:
        return sp.stage.batch_size, 1

    def memory_input(self, plan: Plan, sp: StagePlan, common: dict[str, Any]) -> StageMemoryInput:
        seq = max(t.max_length for t in sp.stage.tasks)
        return StageMemoryInput(self.memory, **{**common, "adapter": "lora"}, seq_len=seq)

    def run(self, plan: Plan, sp: StagePlan, out: Path) -> Record | None:
        return run(plan, sp, out)

    def writes(self, spec: EvalSpec) -> str:
        return "metrics.json, summary.md"


def check(plan: Plan, sp: StagePlan) -> list[Problem]:
    problems: list[Problem] = []
    where = sp.where
    for j, task in enumerate(sp.stage.tasks):
        if task.task:
            try:
                spec = load_task_spec(task.task)
            except (FileNotFoundError, ValueError) as e:
                problems.append((f"{where}.tasks[{j}].task", str(e).splitlines()[0]))
                continue
            if spec.type not in ("mmlu", "generation"):
                problems.append(
                    (
                        f"{where}.tasks[{j}].task",
                        f"task `{spec.name}` is type `{spec.type}`, which is not run from a task file; for "
                        "perplexity give the eval task a recipe dataset (`data: NAME`) instead of `task:`",
                    )
                )
                continue
            if spec.type == "generation":  # a metric's package (MeCab for ja BLEU, say): now, not after generating
                from align.evaluation.generation import missing_metric_packages

                problems += [(f"{where}.tasks[{j}].task", m) for m in missing_metric_packages(spec.metrics)]
            if spec.from_hub:
                plan.warnings.append(f"task `{spec.name}`: hub data `{spec.data.path}` is fetched (once) when it runs")
            elif not spec.resolve_path(data_root(spec.data.path)).exists():
                problems.append((f"{where}.tasks[{j}].task", f"task `{spec.name}` data not found: {spec.data.path}"))
            else:  # every record the stage will read, checked now (as `align eval` does)
                from align.evaluation.tasks import check_task_data

                try:
                    check_task_data(spec, task.task, rows=True)
                except ValueError as e:
                    problems.append((f"{where}.tasks[{j}].task", str(e).splitlines()[0]))
            continue
        spec = plan.recipe.datasets[task.data]
        if not is_local(spec.path):
            plan.warnings.append(f"dataset `{task.data}`: hub id `{spec.path}` is checked when the stage loads it")
            continue
        scan = scan_dataset(spec, Eval.formats, who=Eval.name)  # every row, as the stage reads them
        if not scan.problems:
            from align.stages._train import check_chat_template

            problems += [(f"{where}.tasks[{j}].data", m) for _, m in check_chat_template(plan, sp, [task.data])]
        problems += [(f"datasets.{task.data}.{p}" if p else f"datasets.{task.data}", m) for p, m in scan.problems]
        plan.warnings += [w for w in (f"dataset `{task.data}`: {x}" for x in scan.warnings) if w not in plan.warnings]
    return problems


def load_task_spec(name: str) -> Any:
    """A task file by name (./evaluation/tasks/, then the tasks shipped in the package) or path."""
    from align.evaluation.tasks import load_task

    return load_task(name)


def task_records(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten a run_task result into metric records (aggregate first, then per-subject / per-ROUGE-type)."""
    base = {"task": res["task"], "task_version": res["version"], "n": res["n"], "higher_is_better": True}
    if res["metric"] == "accuracy":
        recs = [{**base, "metric": "accuracy", "value": res["score"], "stderr": res["stderr"]}]
        for subj, r in res.get("per_subject", {}).items():
            recs.append(
                {
                    **base,
                    "task": f"{res['task']}/{subj}",
                    "n": r["n"],
                    "metric": "accuracy",
                    "value": r["accuracy"],
                    "stderr": r["stderr"],
                }
            )
        return recs
    from align.evaluation.score import generation_records

    return generation_records(res)


def run(plan: Plan, sp: StagePlan, out: Path) -> Record | None:
    stage, recipe = sp.stage, plan.recipe
    # config
    write_common(sp, plan, out, {"stage": stage.model_dump(mode="json", by_alias=True), "targets": sp.inputs})
    tokenizer = plan_tokenizer(plan)
    # data
    texts, specs = {}, {}
    for task in stage.tasks:
        if task.task:
            spec = load_task_spec(task.task)
            specs[task.task] = spec.model_copy(update={"limit": task.limit or spec.limit})
            continue
        spec = recipe.datasets[task.data]
        fmt = check_format(peek_rows(spec.path), spec, Eval.formats, task.data)[0] if is_local(spec.path) else "text"
        ds = load_rows(spec)
        if task.max_samples:
            ds = ds.select(range(min(task.max_samples, len(ds))))
        texts[task.data] = texts_of(ds, fmt, tokenizer, completion_only=task.score == "completion")
    # model -> score -> save + metrics
    # recorded by name (the recipe's model, a stage's artifact in the run), not by path: the run can move
    targets = [(t, input_artifact(plan, t)) for t in sp.inputs]
    for t, art in targets:
        art["name"] = plan.base.ref if t == "base" else f"{t}/{Path(art['path']).name}"
    results = evaluate(
        targets,
        stage.tasks,
        tokenizer,
        out,
        texts=texts,
        specs=specs,
        dtype=recipe.model.dtype,
        batch_size=stage.batch_size,
    )
    headline = {f"{r['target']}/{r['task']}/{r['metric']}": r["value"] for r in results}
    if not distributed.is_main():
        return None
    return {"type": "eval", "output": {"kind": "metrics", "path": "metrics.json"}, "metrics": headline}


def evaluate(
    targets: list[tuple[str, dict[str, Any]]],
    tasks: list[Any],
    tokenizer: Any,
    out: Path,
    *,
    texts: dict[str, list[str]],
    specs: dict[str, Any],
    dtype: str = "auto",
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """Score each target on each task, one model in memory at a time; write metrics.json, summary.md
    and comparison.png (bars per target, stderr error bars).

    Shared by the eval stage and `align eval`."""
    from align.evaluation.perplexity import perplexity
    from align.evaluation.runner import run_task
    from align.models import load_for_inference

    main = distributed.is_main()  # items are sharded across processes; the main process writes
    if main:
        out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    predictions = out / "predictions.jsonl"
    device = distributed.device()
    for label, art in targets:
        model = load_for_inference(art, dtype=dtype).to(device).eval()
        head = {"target": label, "model": art.get("name", art["path"]), "adapter": art["kind"] == "adapter"}
        for task in tasks:
            if task.task:
                spec = specs[task.task]
                res = run_task(
                    spec, model, tokenizer, root=data_root(spec.data.path), device=device, progress=main and show_bars()
                )
                results += [{**head, **r, "settings": {"limit": specs[task.task].limit}} for r in task_records(res)]
                if not main:
                    continue
                with predictions.open("a") as fh:
                    row = {"target": label, "task": res["task"], "predictions": res.get("predictions")}
                    fh.write(json.dumps(row, default=str) + "\n")
                continue
            r = perplexity(
                model,
                tokenizer,
                texts[task.data],
                max_length=task.max_length,
                stride=task.stride,
                batch_size=batch_size,
            )
            settings = {
                "max_length": task.max_length,
                "stride": task.stride,
                "score": task.score,
                "tokens": r.tokens,
                "nll": r.nll,
            }
            results.append(
                {
                    **head,
                    "task": task.data,
                    "task_version": 1,
                    "metric": "perplexity",
                    "value": r.perplexity,
                    "stderr": None,
                    "n": r.texts,
                    "higher_is_better": False,
                    "settings": settings,
                }
            )
        del model
    if not main:
        return results
    from align.evaluation.score import write_outputs

    table = write_outputs(
        results, out, processes=distributed.world_size(), peak_memory_bytes=distributed.peak_memory_bytes()
    )
    if not orchestrated() or verbose():  # under `align run` the closing summary shows this table
        print(table, flush=True)
    return results


def resolve_target(ref: str) -> tuple[str, dict[str, Any], Path]:
    """(label, artifact, tokenizer folder) for `align eval`: run, stage, adapter or model folder, or a model name."""
    from align.models import locate, resolve_model

    p = Path(ref)
    if p.is_dir() and not (p / "stage.json").is_file() and not (p / "config.json").is_file():
        stages = [
            d
            for d in sorted(p.iterdir(), key=lambda d: d.stat().st_mtime)
            if (info := read_stage_json(d)) and info["output"]["kind"] != "metrics"
        ]
        if stages:
            p = stages[-1]
    if (p / "stage.json").is_file():
        info = read_stage_json(p)
        if not isinstance(info, dict) or not isinstance(info.get("output"), dict):
            raise RecipeError(
                f"{p / 'stage.json'} is not a finished stage's record (not JSON, or no `output`); run the stage "
                "again (`align run RECIPE --force STAGE`)",
                "TARGET",
            )
        art = locate(info["output"], p)
        if art["kind"] == "metrics":
            raise RecipeError(f"{p} is an eval stage; point at a training stage or model", "TARGET")
        return p.name, art, Path(art["path"])
    if (p / "adapter_config.json").is_file():
        base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise RecipeError(
                f"{p / 'adapter_config.json'} has no `base_model_name_or_path`: set it to the base model's folder",
                "TARGET",
            )
        if not (Path(base) / "config.json").is_file():
            raise RecipeError(f"the adapter's base model `{base}` is not a local folder", "TARGET")
        return p.name, {"kind": "adapter", "path": str(p), "base": base}, p
    if (p / "config.json").is_file():
        return p.name, {"kind": "model", "path": str(p)}, p
    m = resolve_model(ref, materialize=True)
    return ref, {"kind": "model", "path": str(m.path)}, Path(str(m.path))
