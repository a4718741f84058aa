"""`align plan | run | stage`: the command line. Exit codes: 0 done, 1 failure while running, 2 bad recipe or input."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

from align import __version__
from align.errors import AlignError

if TYPE_CHECKING:
    from align.rundir import Plan

EPILOG = """\
overrides: KEY.PATH=VALUE pairs after the recipe, YAML-typed, e.g.
  stages.sft.train.max_steps=5   (list items by name or index)   model=./my-model   seed=1
exit codes: 0 done, 1 a stage failed while running, 2 bad recipe or input (nothing ran), 3 the run is busy
  (another align process holds it; nothing ran), 130 interrupted (resumable)
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="align",
        description="One YAML recipe: SFT, adapters, evaluation - validated, resumable, measured.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"align {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(
            name, help=help, description=help, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        sp.add_argument("recipe", help="path to a recipe YAML (see recipes/)")
        return sp

    plan = add("plan", "validate a recipe without training and show the stage graph (loads no weights)")
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    add_launch(plan)
    plan.add_argument("--json", action="store_true", help="print the whole plan as JSON (for CI and scripts)")
    plan.add_argument(
        "--defaults",
        action="store_true",
        help="also list align's defaults each stage uses (the trainer fields align sets, and why)",
    )
    plan.add_argument(
        "--gpus",
        type=int,
        metavar="N",
        help="plan for N GPUs: memory per GPU is estimated with N processes (and --num-processes defaults to N)",
    )
    plan.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help="memory of one GPU (80GB, 141GB, 24GiB): a stage whose estimated peak exceeds it fails the plan "
        "(exit 2) with the cheapest fixes",
    )
    run = add("run", "run every stage that is not done yet, in order; skips finished, resumes interrupted")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    run.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STAGE",
        help="re-run STAGE (and what depends on it) even if done; repeatable",
    )
    run.add_argument("--only", metavar="STAGE", help="run just this stage (its inputs must be done)")
    add_launch(run)
    run.add_argument(
        "--verbose",
        action="store_true",
        help="show the libraries' own output: their progress bars, the trainers' raw logs and every warning",
    )
    stage = add(
        "stage",
        "run one stage in this process (what `align run` launches; use under your own "
        "`accelerate launch -m align stage RECIPE STAGE`)",
    )
    stage.add_argument("stage", help="the stage name")
    stage.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    stage.add_argument("--fresh", action="store_true", help="ignore checkpoints of an interrupted run")
    stage.add_argument(
        "--plan", metavar="FILE", help="the orchestrator's resolved plan (set by `align run`; by hand, leave it out)"
    )
    stage.add_argument(
        "--verbose",
        action="store_true",
        help="show the libraries' own output: their progress bars, the trainers' raw logs and every warning",
    )
    ev = sub.add_parser(
        "eval",
        help="evaluate models on task files, outside a recipe (optionally gated against a baseline)",
        description="TARGET: a run folder (its last training stage), a stage folder, an adapter folder (loaded on "
        "its base), a model folder, or the embedded model name. Several targets are compared in one table.",
    )
    ev.add_argument("targets", nargs="+", metavar="TARGET")
    ev.add_argument("--tasks", nargs="+", required=True, help="task names in evaluation/tasks/ or task YAML paths")
    ev.add_argument("--limit", type=int, help="first N items of each task (per subject for MMLU)")
    ev.add_argument(
        "--subjects", nargs="+", metavar="SUBJECT", help="MMLU subjects to score instead of the task file's list"
    )
    ev.add_argument("--out", default="runs/eval", help="folder for metrics.json, summary.md (default runs/eval)")
    ev.add_argument("--baseline", help="gate: compare with this metrics.json; exit 1 on regression")
    ev.add_argument(
        "--verbose",
        action="store_true",
        help="show the libraries' own output: their progress bars, the trainers' raw logs and every warning",
    )
    push = sub.add_parser(
        "push",
        help="push a finished stage (adapter, merged model or reward model) with its model card",
        description="SOURCE: a run folder (its last policy stage) or a stage folder. The token comes from HF_TOKEN "
        "or `hf auth login`; it is checked (reachable, accepted, allowed to write) before anything is uploaded. "
        "Exit 2 on any refusal, with nothing uploaded.",
    )
    push.add_argument("source", metavar="RUN_OR_STAGE_DIR")
    where = push.add_mutually_exclusive_group(required=True)
    where.add_argument("--repo-id", metavar="ORG/NAME", help="the hub repository (created if absent)")
    where.add_argument("--to", metavar="URL", help="a folder, file:///... or fsspec URL (s3://...) instead of the hub")
    push.add_argument(
        "--what",
        default="adapter",
        help="adapter (default: the peft adapter), merged (folded into the base) or reward (a reward stage's model)",
    )
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", metavar="BRANCH", help="push to this branch (created if absent)")
    push.add_argument("--base-model", metavar="ORG/NAME", help="the base's hub id, when the run's model is local")
    push.add_argument("--message", help="commit message (default names the recipe and stage)")
    push.add_argument(
        "--dry-run",
        action="store_true",
        help="write the exact folder (files and card) that would be pushed, and say where",
    )
    merge = sub.add_parser(
        "merge",
        help="fold a LoRA/DoRA/QLoRA adapter into its base: safetensors + tokenizer, loadable by transformers alone",
    )
    merge.add_argument("source", metavar="ADAPTER_OR_STAGE_DIR")
    merge.add_argument("--out", required=True, metavar="DIR", help="an empty or new folder")
    merge.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="fp32")
    report = sub.add_parser("report", help="write runs/<run>/report.md and its plots (align run does this at the end)")
    report.add_argument("run_dir", metavar="RUN_DIR")
    cmp = sub.add_parser(
        "compare",
        help="regression gate: compare metrics with a baseline (exit 1 on regression)",
        description="Compare CURRENT metrics (a metrics.json, an eval stage folder or a run folder) with a "
        "baseline. Exit 0 all within tolerance, 1 a metric regressed, 2 unusable input (missing metrics, "
        "mismatched task versions).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmp.add_argument("current", help="metrics.json, eval stage folder, or run folder")
    cmp.add_argument("--baseline", required=True, help="metrics.json (e.g. evaluation/baselines/NAME.json)")
    cmp.add_argument(
        "--tolerance",
        action="append",
        default=[],
        metavar="METRIC=SPEC",
        help="per metric (or task/metric): 0.5 absolute, 2%% relative, 2se stderr units; "
        "default 2se where stderrs exist, else 1%%",
    )
    from align.evaluation.score import add_parser as add_score_parser

    add_score_parser(sub)
    return p


def add_launch(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--accelerate-config",
        metavar="NAME|PATH",
        help="launch every training stage with this accelerate config (a name in accelerate_configs/: cpu, "
        "multi_cpu, single_gpu, multi_gpu, deepspeed_zero2, deepspeed_zero3, ..., or a YAML path); "
        "wins over each stage's `launch:`",
    )
    p.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        help="processes per training stage (GPUs, or CPU processes with multi_cpu); wins over `launch:`",
    )


def main(argv: list[str] | None = None) -> int:  # noqa: C901 - one branch per command
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]  # KEY=VALUE overrides may also follow the flags
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from align import console

    console.setup(want_verbose=getattr(args, "verbose", False))
    # bitsandbytes warns on import that an optional CPU kernel package is missing; it is optional.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if args.command in ("run", "stage") and threading.current_thread() is threading.main_thread():
        # A shell starts background jobs with SIGINT ignored, and children inherit that; `kill -INT` (or a
        # CI runner's cancel) must still checkpoint and stop, so take the default Ctrl-C behaviour back.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "push":
            return cmd_push(args)
        if args.command == "score":
            from align.evaluation.score import main as cmd_score

            check_out_folder(args.out, "--out")
            return cmd_score(args)
        if args.command == "merge":
            from pathlib import Path

            from align.errors import RecipeError
            from align.merge import merge

            try:
                print(f"merged model: {merge(Path(args.source), Path(args.out), dtype=args.dtype)}")
            except RecipeError as e:  # the options by the names the command line gives them
                options = {"out": "--out", "dtype": "--dtype"}
                raise RecipeError([(options.get(p, p), m) for p, m in e.problems]) from None
            return 0
        if args.command == "report":
            from pathlib import Path

            from align.errors import RecipeError
            from align.report import write_report

            if not Path(args.run_dir).is_dir():
                raise RecipeError(f"{args.run_dir} is not a folder: give a run folder (runs/<name>)", "RUN_DIR")
            print(f"report: {write_report(Path(args.run_dir))}")
            return 0
        if args.command == "stage":
            from align.pipeline import execute_stage

            execute_stage(args.recipe, args.stage, args.overrides, fresh=args.fresh, plan_path=args.plan)
            return 0
    except AlignError as e:
        print(f"align: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("align: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


def cmd_eval(args: Any) -> int:
    from pathlib import Path

    from align.errors import RecipeError
    from align.evaluation.compare import load_metrics
    from align.evaluation.tasks import check_task_data
    from align.models import check_adapter_folder, check_artifact, load_tokenizer
    from align.resources import data_root
    from align.stages.evaluate import EvalTask, evaluate, load_task_spec, resolve_target

    # every input checked before a model is loaded: exit 2 means nothing ran
    if args.limit is not None and args.limit < 1:
        raise RecipeError(f"must be at least 1 (got {args.limit}); leave it out to evaluate every item", "--limit")
    out = Path(args.out)
    check_out_folder(out, "--out")
    if args.baseline:
        load_metrics(args.baseline, "--baseline")
    problems: list[tuple[str, str]] = []
    repeated = sorted({t for t in args.tasks if args.tasks.count(t) > 1})
    if repeated:
        problems.append(("--tasks", f"{', '.join(repeated)} listed more than once"))
    specs = {}
    for name in dict.fromkeys(args.tasks):
        try:
            spec = load_task_spec(name)
        except (FileNotFoundError, ValueError) as e:
            problems.append((f"--tasks {name}", str(e).splitlines()[0]))
            continue
        if spec.type not in ("mmlu", "generation"):
            problems.append(
                (
                    f"--tasks {name}",
                    f"task type `{spec.type}` is not run from a task file; use mmlu or "
                    "generation (perplexity: an eval stage's `data:` task in a recipe)",
                )
            )
            continue
        if args.subjects:
            if spec.type != "mmlu":
                problems.append(
                    ("--subjects", f"task `{spec.name}` is not an MMLU task; --subjects picks MMLU subjects")
                )
                continue
            spec = spec.model_copy(update={"data": spec.data.model_copy(update={"subjects": list(args.subjects)})})
        if spec.type == "generation":
            from align.evaluation.generation import missing_metric_packages

            problems += [(f"--tasks {name}", m) for m in missing_metric_packages(spec.metrics)]
        if spec.from_hub:
            try:
                spec.data_source(data_root(spec.data.path))  # fetched once (or found in the cache) before a model loads
            except ValueError as e:
                problems.append((f"--tasks {name}", str(e)))
                continue
            specs[name] = spec.model_copy(update={"limit": args.limit or spec.limit})
            continue
        data = spec.resolve_path(data_root(spec.data.path))
        if not data.exists():
            problems.append((f"--tasks {name}", f"task `{spec.name}`: data.path {spec.data.path} not found ({data})"))
            continue
        try:
            check_task_data(spec, name, rows=True)  # every record, before any model is loaded
        except ValueError as e:
            problems.append((f"--tasks {name}", str(e).splitlines()[0]))
            continue
        specs[name] = spec.model_copy(update={"limit": args.limit or spec.limit})
    targets = []
    for t in args.targets:
        where = f"TARGET {t}"
        p = Path(t).expanduser()
        head = Path(t).parts[0] if Path(t).parts else ""
        if not p.exists() and (t.startswith((".", "/", "~")) or len(Path(t).parts) > 2 or Path(head).is_dir()):
            problems.append((where, "does not exist: give a run, stage, adapter or model folder, or a model name"))
            continue
        try:
            if p.is_dir() and (p / "adapter_config.json").is_file():
                check_adapter_folder(p, where)  # before resolve_target reads it (pickled weights refused)
            label, art, tok_dir = resolve_target(t)
            check_artifact(art, where)
        except RecipeError as e:
            problems += [(where, m) for _, m in e.problems]
            continue
        except (OSError, ValueError, KeyError, TypeError) as e:  # a stage.json or adapter_config.json gone wrong
            problems.append(
                (where, f"cannot be read as a run, stage, adapter or model folder ({type(e).__name__}: {e})")
            )
            continue
        targets.append((label, art, tok_dir))
    if problems:
        raise RecipeError(problems)
    try:
        tokenizer = load_tokenizer(Path(targets[0][2]))
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RecipeError(
            f"no usable tokenizer in {targets[0][2]} ({first[:200]})", f"TARGET {args.targets[0]}"
        ) from None
    evaluate(
        [(label, art) for label, art, _ in targets],
        [EvalTask(task=n) for n in specs],
        tokenizer,
        out,
        texts={},
        specs=specs,
    )
    print(f"metrics: {out / 'metrics.json'}")
    if args.baseline:
        args.current, args.tolerance = args.out, []
        return cmd_compare(args)
    return 0


def check_out_folder(out: Any, field: str) -> None:
    """An output folder that can be made: not a file, nor under one (checked before anything is computed)."""
    from pathlib import Path

    from align.errors import RecipeError

    out = Path(out).expanduser()
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                what = "is a file" if folder == out else f"is under {folder}, which is a file"
                raise RecipeError(f"{out} {what}; give a folder for metrics.json and summary.md", field)
            return


def _json_record(f: Any, field: str) -> dict[str, Any]:
    """run.json / stage.json of a run folder: a JSON object, else RecipeError naming the file."""
    from align.models import read_json_mapping

    return read_json_mapping(f, field, "the run folder is damaged; run the recipe again")


def cmd_push(args: Any) -> int:
    from pathlib import Path

    from align.errors import RecipeError
    from align.rundir import read_stage_json
    from align.stages.push import WHAT, repo_id_problem, ship
    from align.stages.reward import PUSH_WHAT

    if args.what not in WHAT:
        raise RecipeError(f"`{args.what}` is not one of {', '.join(WHAT)}", "--what")
    if args.repo_id is not None and (why := repo_id_problem(args.repo_id)):
        raise RecipeError(why, "--repo-id")

    src = Path(args.source).resolve()
    if not src.is_dir():
        raise RecipeError(f"{src} is not a folder", "RUN_OR_STAGE_DIR")
    if (src / "stage.json").is_file() or (src.parent / "run.json").is_file():
        run_dir, stage = src.parent, src.name  # a stage folder (done or not: `ship` refuses one not done)
        if (src / "stage.json").is_file():
            _json_record(src / "stage.json", "RUN_OR_STAGE_DIR")
    else:  # a run folder: its last policy stage (or reward stage, for --what reward)
        run_dir = src
        want = "produces_reward" if args.what == PUSH_WHAT else "produces_policy"
        rec = _json_record(src / "run.json", "RUN_OR_STAGE_DIR") if (src / "run.json").is_file() else {}
        stages = rec.get("stages", [])
        if not isinstance(stages, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str) for s in stages
        ):
            raise RecipeError(
                f"{src / 'run.json'}: `stages` is not a list of stages; run the recipe again", "RUN_OR_STAGE_DIR"
            )
        names = [s["name"] for s in stages]
        done = [n for n in names if (info := read_stage_json(src / n)) and (info.get("traits") or {}).get(want)]
        if not done:
            raise RecipeError(f"{src} has no finished stage to push as `{args.what}`", "RUN_OR_STAGE_DIR")
        stage = done[-1]
    base = args.base_model
    if base is None and (run_dir / "run.json").is_file():
        base_model = _json_record(run_dir / "run.json", "RUN_OR_STAGE_DIR").get("base_model")
        base = base_model.get("hub_id") if isinstance(base_model, dict) else None
    if base is None and args.what == "adapter":
        raise RecipeError(
            "the run's base model is a local folder: a pushed adapter must name its base on the hub; pass "
            "--base-model ORG/NAME, or push --what merged",
            "--base-model",
        )
    target = args.repo_id or args.to
    message = args.message or f"align: {args.what} of stage `{stage}` of run `{run_dir.name}`"
    dest = run_dir / ".push" / stage if not args.dry_run else run_dir / "push-dry-run" / stage
    out = ship(
        run_dir,
        stage,
        args.what,
        target,
        dest,
        base_hub_id=base,
        commit_message=message,
        private=args.private,
        revision=args.revision,
        dry_run=args.dry_run,
    )
    if not args.dry_run:
        import shutil

        shutil.rmtree(dest.parent, ignore_errors=True)
    done = "dry run: would push" if args.dry_run else "pushed"
    print(f"{done} {out['files']} files ({out['bytes']} bytes) -> {out['url']}")
    return 0


def cmd_compare(args: Any) -> int:
    from align.errors import RecipeError
    from align.evaluation.compare import compare, load_metrics, parse_tolerance, render

    tol = {}
    for t in args.tolerance:
        k, _, v = t.partition("=")
        if not k.strip() or not v.strip():
            raise RecipeError(f"`{t}` is not METRIC=SPEC (e.g. accuracy=2se, perplexity=2%)", "--tolerance")
        try:
            parse_tolerance(v)
        except RecipeError as e:
            raise RecipeError(e.problems[0][1], f"--tolerance {k}") from None
        tol[k.strip()] = v.strip()
    current = load_metrics(args.current, "CURRENT")
    baseline = load_metrics(args.baseline, "--baseline")
    rows = compare(current, baseline, tol)
    print(render(rows))
    return 1 if any(r.regressed for r in rows) else 0


def cmd_plan(args: Any) -> int:
    from align.errors import RecipeError
    from align.memory import fixes, human, parse_size
    from align.pipeline import make_plan

    if args.gpus is not None and args.gpus < 1:
        raise RecipeError(f"must be at least 1 (got {args.gpus})", "--gpus")
    gpu_bytes = None
    if args.gpu_memory:
        try:
            gpu_bytes = parse_size(args.gpu_memory)
        except ValueError as e:
            raise RecipeError(str(e), "--gpu-memory") from None
        if gpu_bytes <= 0:
            raise RecipeError(f"must be more than 0 (got {args.gpu_memory}); e.g. 80GB, 24GiB", "--gpu-memory")
    if args.gpus and args.num_processes is None:
        args.num_processes = args.gpus
    plan = make_plan(args.recipe, args.overrides, **launch_args(args), gpus=args.gpus)
    from align.pipeline import memory_plan

    memory = memory_plan(plan, args.gpus)
    too_big = []
    if gpu_bytes is not None:
        for name, est in memory["stages"].items():
            if est["bytes"]["total"] > gpu_bytes:
                from align.memory import StageMemoryInput

                todo = fixes(est["shape"], StageMemoryInput(**est["input"]), gpu_bytes)
                too_big.append(
                    (
                        f"stages.{name}",
                        f"needs ~{human(est['bytes']['total'])} per GPU, more than "
                        f"{human(gpu_bytes)}; cheapest fixes: " + "; ".join(todo),
                    )
                )
    if args.json:
        import json

        print(json.dumps(plan_json(plan, memory, gpu_bytes), indent=2))
    else:
        print(render_plan(plan, memory if (args.gpus or gpu_bytes) else None, defaults=args.defaults))
    if too_big:
        raise RecipeError(too_big)
    return 0


def launch_args(args: Any) -> dict[str, Any]:
    from align.errors import RecipeError

    if args.num_processes is not None and args.num_processes < 1:
        raise RecipeError(f"must be at least 1 (got {args.num_processes})", "--num-processes")
    return {"launch_config": args.accelerate_config, "launch_processes": args.num_processes}


def plan_json(plan: Plan, memory: dict[str, Any] | None = None, gpu_bytes: int | None = None) -> dict[str, Any]:
    """The whole plan as data: stages, links, status, launch, global batch, memory estimate (bytes)."""
    from align.launch import global_batch
    from align.stages.registry import stage_of

    stages = []
    for sp in plan.stages:
        kind = stage_of(sp.stage)
        row: dict[str, Any] = {
            "name": sp.name,
            "type": sp.stage.type,
            "inputs": sp.inputs,
            "status": sp.status,
            "detail": sp.detail,
            "fingerprint": sp.fingerprint,
            "folder": str(sp.final_dir),
            **kind.plan_fields(sp),
            "defaults": {d.key: {"value": d.value, "why": d.why} for d in kind.applied_defaults(plan, sp)},
        }
        if sp.name in plan.launches:
            info, micro, accum = plan.launches[sp.name]
            row["launch"] = {
                "accelerate_config": info.config_name,
                "config_path": str(info.config_path),
                "distributed_type": info.distributed_type,
                "num_processes": info.num_processes,
                "num_machines": info.num_machines,
                "zero_stage": info.zero_stage,
                "mode": info.mode,
            }
            row["batch"] = {"micro": micro, "accumulation": accum, "global": global_batch(info, micro, accum)}
        if memory is not None:
            est = memory["stages"].get(sp.name)
            row["memory"] = (
                {
                    "bytes_per_gpu": est["bytes"],
                    "n_gpus": est["input"]["n_gpus"],
                    "sharding": est["input"]["sharding"],
                    "fits": None if gpu_bytes is None else est["bytes"]["total"] <= gpu_bytes,
                }
                if est
                else {"estimate": None, "reason": memory.get("reason")}
            )
        stages.append(row)
    return {
        "recipe": str(plan.recipe_path),
        "run_dir": str(plan.run_dir),
        "model": {
            "ref": plan.base.ref,
            "kind": plan.base.kind,
            "path": str(plan.base.path) if plan.base.path else None,
        },
        "stages": stages,
        "gpu_memory_bytes": gpu_bytes,
        "memory_source": (memory or {}).get("source"),
        "notes": plan.warnings,
    }


def render_plan(plan: Plan, memory: dict[str, Any] | None = None, *, defaults: bool = False) -> str:
    from align.stages.registry import stage_of

    base = plan.base
    lines = [
        f"recipe  {plan.recipe_path}",
        f"run     {plan.run_dir}",
        f"model   {base.ref} ({base.kind}{', ' + str(base.path) if base.path else ''})",
        "",
        f"{'#':<3}{'stage':<16}{'type':<7}{'input':<20}{'status':<11}writes",
    ]
    for sp in plan.stages:
        st, kind = sp.stage, stage_of(sp.stage)
        what, inputs = kind.writes(st), kind.describe_inputs(sp)
        lines.append(
            f"{sp.index:<3}{sp.name:<16}{st.type:<7}{inputs:<20}{sp.status:<11}"
            f"{sp.final_dir.relative_to(plan.run_dir.parent)}/ ({what})"
        )
        if sp.detail:
            lines.append(f"{'':<37}{sp.detail}")
        if sp.name in plan.launches and kind.follows_cli_launch:
            from align.launch import global_batch

            info, micro, accum = plan.launches[sp.name]
            procs = f"{info.num_processes} process{'es' if info.num_processes > 1 else ''}"
            lines.append(
                f"{'':<37}launch {info.describe()}, global batch {global_batch(info, micro, accum)}"
                f" ({micro} per process x {accum} accumulation x {procs})"
            )
        if memory is not None and (est := memory["stages"].get(sp.name)):
            from align.memory import human

            b = est["bytes"]
            parts = ", ".join(f"{k} {human(v)}" for k, v in b.items() if k != "total" and v)
            lines.append(f"{'':<37}memory ~{human(b['total'])} per GPU x{est['input']['n_gpus']} ({parts})")
        if defaults:
            for d in kind.applied_defaults(plan, sp):
                lines.append(f"{'':<37}default {d.key}={d.value!r}: {d.why}")
    for w in plan.warnings:
        lines.append(f"note: {w}")
    if memory is not None and not memory["stages"]:
        names = ", ".join(sp.name for sp in plan.stages)
        lines.append(f"note: no memory estimate for stages {names}: {memory.get('reason')}")
    todo = [sp.name for sp in plan.stages if sp.status != "done"]
    lines.append("")
    lines.append(
        f"{len(plan.stages) - len(todo)} of {len(plan.stages)} stages done"
        + (f"; `align run {plan.recipe_path.name}` runs: {', '.join(todo)}" if todo else "")
    )
    return "\n".join(lines)


def cmd_run(args: Any) -> int:
    import time

    from align.pipeline import make_plan, run

    t0 = time.time()
    plan = make_plan(args.recipe, args.overrides, **launch_args(args))
    if args.only:
        plan.recipe.stage(args.only)
    print(render_plan(plan), flush=True)
    rows = run(plan, force=set(args.force), only=args.only)
    from align.report import write_report

    report = write_report(plan.run_dir)
    print(render_summary(plan, rows, time.time() - t0) + f"\n\nreport: {report}", flush=True)
    return 0


def render_summary(plan: Plan, rows: list[dict[str, Any]], seconds: float) -> str:
    """The closing table: what ran, how long, headline metrics, where the outputs are."""
    from align.rundir import read_stage_json
    from align.stages.registry import stage_of

    lines = ["", f"== {plan.recipe.name}: done in {seconds:.0f}s ({plan.run_dir}) =="]
    for row in rows:
        info = read_stage_json(plan.get(row["name"]).final_dir) or {}
        m = info.get("metrics", {})
        head = stage_of(plan.get(row["name"]).stage).headline(m)
        lines.append(f"  {row['name']:<16}{row['status']:<9}{row['seconds']:>7.0f}s  {head}")
    for sp in plan.stages:
        if (sp.final_dir / "summary.md").is_file():
            lines += ["", f"{sp.name}:", (sp.final_dir / "summary.md").read_text().rstrip()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
