"""Stage graph, hand-off of artifacts, skip-if-done, resume, and launching stage processes.

The run directory is the contract between stages:

    runs/<run>/<stage>/          final, complete output (only ever replaced whole, by a rename)
        stage.json               written last: fingerprint, output artifact, output hash, timings
        config.yaml inputs.json versions.json metrics.json train_log.jsonl  + the artifact folder
    runs/<run>/.partial/<stage>/ a stage in progress: checkpoints/ and out/ (becomes the final folder)

A stage is done when its stage.json fingerprint equals the one computed now from its config, its
data's content hashes and its input artifact's hash. The orchestrator decides and launches; the
stage process (`align stage RECIPE STAGE`, also under a user's own `accelerate launch`) trains.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from align import __version__, distributed
from align.data import dataset_identity, file_hash
from align.errors import AlignError, Busy, RecipeError, StageFailed
from align.models import ResolvedModel, _embedded_gguf, resolve_model
from align.recipe import Recipe, load_recipe
from align.rundir import (
    Plan,
    StagePlan,
    check_writable,
    finalize,
    latest_checkpoint,
    plan_file,
    plan_from_record,
    plan_record,
    read_stage_json,
    run_lock,
)
from align.spec import TrainSpec
from align.stages.registry import stage_of


def default_source(recipe: Recipe, index: int) -> str:
    """A stage's model comes from the last earlier policy stage, or the base model."""
    for st in reversed(recipe.stages[:index]):
        if stage_of(st).produces_policy:
            return st.name
    return "base"


def stage_plan(recipe: Recipe, run_dir: Path, index: int) -> StagePlan:
    st = recipe.stages[index]
    kind = stage_of(st)
    inputs = kind.inputs(recipe, st, default_source(recipe, index), stage_of)
    datasets = sorted({ref for ref, _ in kind.dataset_refs(st)})
    return StagePlan(st, index, inputs, run_dir / st.name, run_dir / ".partial" / st.name, datasets)


def base_identity(base: ResolvedModel) -> dict[str, Any]:
    if base.kind == "embedded":
        return {"embedded": base.ref, "gguf_sha256": file_hash(_embedded_gguf(base.ref))}
    if base.kind == "local" and base.path is not None:
        files = sorted(f for f in base.path.iterdir() if f.suffix in {".json", ".safetensors", ".jinja"})
        return {"local_files": {f.name: file_hash(f) for f in files}}  # content, not where it lies
    return {"hub": base.ref, "snapshot": base.path.name if base.path else None}


def make_plan(
    recipe_path: str | Path,
    overrides: list[str] | None = None,
    *,
    materialize: bool = False,
    launch_config: str | None = None,
    launch_processes: int | None = None,
    check_launches: bool = True,
    gpus: int | None = None,
) -> Plan:
    """Validate the recipe and compute every stage's fingerprint and status. Loads no weights.

    `launch_config` / `launch_processes` (the command line's) set the launch of every training stage."""
    overrides = list(overrides or [])
    recipe = load_recipe(recipe_path, overrides)
    problems = file_problems(recipe)
    if problems:
        raise RecipeError(problems)
    base = resolve_model(
        recipe.model.name_or_path, recipe.model.revision, materialize=materialize, estimate_only=gpus is not None
    )
    run_dir = (Path(recipe.output_dir) / recipe.name).resolve()
    plan = Plan(recipe, Path(recipe_path).resolve(), overrides, run_dir, base)
    plan.launch_config, plan.launch_processes, plan.gpus = launch_config, launch_processes, gpus
    if base.note:
        plan.warnings.append(f"model `{base.ref}`: {base.note}")
    plan.stages = [stage_plan(recipe, run_dir, i) for i in range(len(recipe.stages))]
    problems = [p for sp in plan.stages for p in stage_of(sp.stage).check(plan, sp)]
    problems += launch_checks(plan) if check_launches else []
    if problems:
        raise RecipeError(problems)
    return refresh(plan)


def file_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """The recipe's own files and folders, before anything is resolved: the chat template (a readable, non-empty
    Jinja template, as the tokenizer will compile it) and the output folder (not a file, nor under one)."""
    problems: list[tuple[str, str]] = []
    if recipe.model.chat_template is not None:
        problem = template_problem(Path(recipe.model.chat_template).expanduser())
        if problem:
            problems.append(("model.chat_template", problem))
    out = Path(recipe.output_dir).expanduser()
    for folder in (out / recipe.name, *(out / recipe.name).parents):
        if folder.exists():
            if not folder.is_dir():
                problems.append(
                    ("output_dir", f"{folder} is a file, so the run folder {out / recipe.name} cannot be made there")
                )
            break
    return problems


def template_problem(path: Path) -> str | None:
    if not path.exists():
        return f"{path} does not exist: give a .jinja file, or leave `chat_template` out to use the tokenizer's"
    if not path.is_file():
        return f"{path} is not a file: give a .jinja file"
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        return f"{path} cannot be read ({e.strerror or e})"
    except UnicodeDecodeError as e:
        return f"{path} is not UTF-8 text (byte at offset {e.start})"
    if not text.strip():
        return f"{path} is empty: a chat template turns messages into text"
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:  # the environment transformers compiles chat templates in
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).parse(text)
    except TemplateSyntaxError as e:
        return f"{path} line {e.lineno}: not a valid Jinja template ({e.message})"
    return None


def refresh(plan: Plan, start: int = 0) -> Plan:
    """Every stage's fingerprint and status from `start` on, from the run folder as it is now (after a stage
    finished, say). The recipe is not read or validated again."""
    base_id = base_identity(plan.base)
    recipe = plan.recipe
    for sp in plan.stages[start:]:
        sp.fingerprint, sp.status, sp.detail = None, "pending", ""
        input_ids = []
        for src in sp.inputs:
            if src == "base":
                input_ids.append({"base": base_id})
                continue
            up = plan.get(src)
            info = read_stage_json(up.final_dir)
            if up.status != "done" or not info:
                input_ids = None
                break
            input_ids.append({"stage": src, "output_sha256": info["output_sha256"]})
        if input_ids is None:
            sp.detail = f"waits for {', '.join(s for s in sp.inputs if s != 'base')}"
            continue
        st = sp.stage
        ident = {
            "align": __version__,
            "stage": st.model_dump(mode="json", by_alias=True, exclude={"launch"}),
            "model": {
                **recipe.model.model_dump(mode="json", exclude={"name_or_path", "revision", "chat_template"}),
                "chat_template_sha256": file_hash(Path(t)) if (t := recipe.model.chat_template) else None,
            },
            "seed": recipe.seed,
            "inputs": input_ids,
            "resolved": stage_of(st).resolved_config(plan, sp),  # align's defaults count too
            "data": {n: dataset_identity(recipe.datasets[n]) for n in sp.datasets},
        }
        sp.fingerprint = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        done = read_stage_json(sp.final_dir)
        if done and done.get("fingerprint") == sp.fingerprint:
            sp.status, sp.detail = "done", f"finished {done.get('finished', '?')}"
        elif (ck := latest_checkpoint(sp)) is not None:
            sp.status, sp.detail = "resumable", f"from {ck.name}"
        elif done:
            sp.status, sp.detail = "changed", "config, data or input changed since the last run"
    return plan


def launch_checks(plan: Plan) -> list[tuple[str, str]]:
    """Every stage's launch read and checked before anything runs; the results are kept for the plan table."""
    from align.launch import check_launch, read_launch

    problems: list[tuple[str, str]] = []
    for sp in plan.stages:
        st, kind, where = sp.stage, stage_of(sp.stage), sp.where
        launch = effective_launch(plan, sp)
        config = launch.accelerate_config
        if config == "auto" and plan.gpus:  # planned for GPUs, perhaps on a machine without one
            config = "multi_gpu" if (launch.num_processes or plan.gpus) > 1 else "single_gpu"
        try:
            info = read_launch(config, launch.num_processes, launch.mode)
        except RecipeError as e:
            from_cli = plan.launch_config is not None and kind.follows_cli_launch
            for p, m in e.problems:
                item = ("--accelerate-config", m) if from_cli else (f"{where}.{p}", m)
                if item not in problems:
                    problems.append(item)
            continue
        micro, accum = kind.batch(plan, sp)
        found, notes = check_launch(
            info,
            adapter_type=getattr(getattr(st, "adapter", None), "type", None),
            micro_batch=micro,
            grad_accum=accum,
            where=where,
        )
        problems += found + kind.launch_problems(info, where)
        plan.warnings += notes
        plan.launches[st.name] = (info, micro, accum)
    return problems


# ---------------------------------------------------------------- orchestrator


def run(plan: Plan, *, force: set[str] = frozenset(), only: str | None = None) -> list[dict[str, Any]]:
    """Run every stage that is not done, in order, each as its own process. Returns a summary row per stage.

    The recipe was validated once, by `make_plan`; each stage process reads this plan from a file."""
    unknown = set(force) - {p.name for p in plan.stages}
    if unknown:
        raise RecipeError(f"no stage named {sorted(unknown)}", "--force")
    check_writable(plan.run_dir)
    if plan.base.path is None:  # convert the embedded model or download from the hub once, before any stage
        plan.base = resolve_model(plan.recipe.model.name_or_path, plan.recipe.model.revision, materialize=True)
    check_hub_datasets(plan)
    for sp in plan.stages:  # network and credentials (a push target, say): before anything trains
        if sp.status != "done" and (not only or sp.name == only):
            stage_of(sp.stage).preflight(plan, sp)
    rows = []
    # On a multi-node run every node runs `align run` over a shared run folder: node 0 holds the run lock and
    # finalizes; the other nodes take part in each stage, then wait until node 0 has marked it done.
    node = machine_rank()
    with run_lock(plan.run_dir) if node == 0 else contextlib.nullcontext():
        if node == 0:
            write_run_record(plan)
        for i, sp in enumerate(plan.stages):
            if only and sp.name != only:
                continue
            if sp.name in force or any(r["ran"] for r in rows if r["name"] in sp.inputs):
                sp.status = "forced" if sp.name in force else "pending"
            if sp.status == "done":
                print(f"[align] {sp.name}: done, skipped ({sp.detail})", flush=True)
                rows.append({"name": sp.name, "type": sp.stage.type, "status": "skipped", "ran": False, "seconds": 0.0})
                continue
            t0 = time.time()
            print(start_line(plan, sp), flush=True)
            if node == 0 or spans_nodes(plan, sp):
                try:
                    launch_stage(plan, sp, fresh=sp.name in force, node=node)
                except RecipeError as e:
                    if not any(r["ran"] for r in rows):
                        raise
                    # exit 2 says nothing ran; earlier stages of this run did (and are kept, done)
                    done = ", ".join(r["name"] for r in rows if r["ran"])
                    raise StageFailed(f"{e} (stages {done} ran and are kept; fix this and run again)") from None
            if node != 0:
                wait_done(sp)  # a one-machine stage (eval, say) runs on node 0 only
            refresh(plan, i)  # this stage is done now; later fingerprints may change with its output
            rows.append(
                {"name": sp.name, "type": sp.stage.type, "status": "ran", "ran": True, "seconds": time.time() - t0}
            )
    return rows


def start_line(plan: Plan, sp: StagePlan) -> str:
    """`[align] sft: running sft (lora) from base | multi_cpu x2 | 24 steps | resuming from checkpoint-8`."""
    st, kind = sp.stage, stage_of(sp.stage)
    adapter = getattr(st, "adapter", None)
    what = st.type + (f" ({adapter.type})" if adapter is not None else "")
    parts = [f"{what} {'on' if kind.evaluates else 'from'} {kind.describe_inputs(sp)}"]
    if sp.name in plan.launches:
        parts.append(plan.launches[sp.name][0].describe())
    elif st.launch.mode != "python":
        parts.append(f"accelerate x{st.launch.num_processes or 1}")
    if isinstance(st, TrainSpec):
        args = kind.resolved_config(plan, sp)
        steps, epochs = args.get("max_steps", -1), args.get("num_train_epochs")
        parts.append(f"{steps} steps" if isinstance(steps, int) and steps > 0 else f"{epochs or 1:g} epochs")
    if sp.status == "resumable":
        parts.append(f"resuming {sp.detail}")
    elif sp.status == "changed":
        parts.append(f"again: {sp.detail}")
    elif sp.status == "forced":
        parts.append("forced")
    return f"[align] {sp.name}: running " + " | ".join(parts)


def write_run_record(plan: Plan) -> None:
    """runs/<run>/run.json: the recipe as run (resolved), its overrides, the git commit of its folder, the stages."""
    from align.models import hub_id

    record = {
        "recipe": run_relative(plan.recipe.model_dump(mode="json", by_alias=True), plan.run_dir),
        "recipe_file": plan.recipe_path.name,
        "overrides": plan.overrides,
        "git": git_state(plan.recipe_path.parent),
        "stages": [{"name": sp.name, "type": sp.stage.type} for sp in plan.stages],
        "base_model": {"ref": plan.base.ref, "kind": plan.base.kind, "hub_id": hub_id(plan.base)},
    }
    tmp = plan.run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.rename(plan.run_dir / "run.json")


def run_relative(x: Any, run_dir: Path) -> Any:
    """Absolute local paths (datasets, model folders, templates) made relative to the run folder: it can move."""
    if isinstance(x, dict):
        return {k: run_relative(v, run_dir) for k, v in x.items()}
    if isinstance(x, list):
        return [run_relative(v, run_dir) for v in x]
    if isinstance(x, str) and x.startswith("/") and Path(x).exists():
        return os.path.relpath(x, run_dir)
    return x


def git_state(folder: Path) -> dict[str, Any] | None:
    """The commit (and whether the tree has changes) of the git repository holding `folder`, if any."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def machine_rank() -> int:
    """This machine's rank in a multi-node run (the variables the multi_node config documents), else 0."""
    return int(os.environ.get("MACHINE_RANK") or os.environ.get("NODE_RANK") or os.environ.get("SLURM_NODEID") or 0)


def spans_nodes(plan: Plan, sp: StagePlan) -> bool:
    from align.launch import read_launch

    launch = effective_launch(plan, sp)
    if launch.mode == "python":
        return False
    return read_launch(launch.accelerate_config, launch.num_processes, launch.mode).num_machines > 1


def wait_done(sp: StagePlan, timeout_s: float = 1800) -> None:
    """A non-zero node: the stage is done once node 0 has finalized it (stage.json with this fingerprint)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        info = read_stage_json(sp.final_dir)
        if info and info.get("fingerprint") == sp.fingerprint:
            return
        time.sleep(1)
    raise StageFailed(f"stage `{sp.name}`: node 0 did not mark it done within {timeout_s:.0f}s")


def launch_stage(plan: Plan, sp: StagePlan, *, fresh: bool = False, node: int = 0) -> None:
    """Start the stage process (under `accelerate launch` by default) and wait for it. It reads this plan."""
    from align.launch import launch_command, read_launch

    launch = effective_launch(plan, sp)
    pf = plan_file(plan.run_dir, sp.name, node)
    pf.parent.mkdir(parents=True, exist_ok=True)
    pf.write_text(json.dumps(plan_record(plan)))
    stage_args = ["-m", "align", "stage", str(plan.recipe_path), sp.name, *plan.overrides, "--plan", str(pf)]
    if fresh:
        stage_args.append("--fresh")
    # -P: the current folder is not put first on sys.path (a `trl/` folder there must not shadow the library)
    env = {**os.environ, "ALIGN_PARENT_PID": str(os.getpid()), "PYTHONSAFEPATH": "1"}
    if launch.mode == "python":
        cmd = [sys.executable, *stage_args]
    else:
        info = read_launch(launch.accelerate_config, launch.num_processes, launch.mode)
        cmd, env = launch_command(info, dtype=plan.recipe.model.dtype, stage_args=stage_args, env=env)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        # Ask the stage to checkpoint and stop, then wait: the partial folder stays resumable.
        print("\n[align] interrupted: asking the stage to save a checkpoint and stop...", flush=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    finally:
        pf.unlink(missing_ok=True)
    if code == 2:
        raise RecipeError(f"stage `{sp.name}` rejected its input (see the message above)", sp.name)
    if code == 3:
        raise Busy(f"stage `{sp.name}` is held by another align process (see the message above)")
    if code != 0:
        raise StageFailed(f"stage `{sp.name}` failed (exit {code}); its partial state is in {sp.partial_dir}")


def effective_launch(plan: Plan, sp: StagePlan) -> Any:
    """The stage's `launch:` with this run's command-line launch (if any) on top."""
    launch = sp.stage.launch
    if not stage_of(sp.stage).follows_cli_launch or (plan.launch_config is None and plan.launch_processes is None):
        return launch  # the command line sets the training stages; an eval stage keeps its own `launch:`
    update: dict[str, Any] = {"mode": "accelerate"}
    if plan.launch_config is not None:
        update["accelerate_config"] = plan.launch_config
    if plan.launch_processes is not None:
        update["num_processes"] = plan.launch_processes
    return launch.model_copy(update=update)


def check_hub_datasets(plan: Plan) -> None:
    """A hub dataset that is neither cached nor reachable fails here, in seconds, not inside a stage."""
    from huggingface_hub import HfApi, snapshot_download

    from align.data import is_local

    for name, spec in plan.recipe.datasets.items():
        if is_local(spec.path):
            continue
        try:
            snapshot_download(spec.path, repo_type="dataset", local_files_only=True)
            continue
        except Exception:
            pass
        try:
            HfApi().dataset_info(spec.path, timeout=10)
        except Exception as e:
            raise RecipeError(
                f"cannot reach hub dataset `{spec.path}` ({type(e).__name__}); without network, download it "
                "elsewhere and point `path` at the local files",
                f"datasets.{name}.path",
            ) from None


# ---------------------------------------------------------------- stage process side


def load_plan(path: Path) -> Plan:
    """The orchestrator's plan, as `launch_stage` wrote it: no recipe parsing, no plan-time checks again."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AlignError(f"cannot read the plan file {path}: {e}") from None
    return plan_from_record(rec, Recipe.model_validate(rec["recipe"]))


def execute_stage(
    recipe_path: str, stage_name: str, overrides: list[str], *, fresh: bool = False, plan_path: str | None = None
) -> None:
    """The stage process: plan (or read the orchestrator's plan), take the stage lock, run the stage, finalize
    on the main process. Started by hand (no plan file) it validates the recipe itself.

    Under N processes the main process alone takes the lock, (re)creates the partial folder and writes its
    marker while the others wait at a barrier; every rank then runs the stage; the main process finalizes."""
    if plan_path:
        plan = load_plan(Path(plan_path))
    else:  # the launch was checked by whoever launched this process (and this process is running under it)
        plan = make_plan(recipe_path, overrides, materialize=True, check_launches=False)
    sp = plan.get(plan.recipe.stage(stage_name).name)
    from align.console import quiet_transformers

    quiet_transformers()
    if sp.fingerprint is None:
        raise AlignError(f"stage `{sp.name}` needs {sp.inputs} done first; run `align run {recipe_path}`")
    if sp.status == "done" and not fresh:
        print(f"[align] {sp.name}: already done", flush=True)
        return
    main = distributed.is_main()
    if main:
        sp.partial_dir.mkdir(parents=True, exist_ok=True)
    lock = run_lock(sp.partial_dir.parent, f"{sp.name}.lock", wait_s=120) if main else contextlib.nullcontext()
    with lock:
        marker = sp.partial_dir / "fingerprint"
        if main and (fresh or not marker.is_file() or marker.read_text().strip() != sp.fingerprint):
            shutil.rmtree(sp.partial_dir, ignore_errors=True)
            sp.partial_dir.mkdir(parents=True)
            marker.write_text(sp.fingerprint or "")
        distributed.barrier()  # the other ranks start only once the partial folder is in place
        out = sp.partial_dir / "out"
        kind = stage_of(sp.stage)
        record = kind.run(plan, sp, out)
        if main and record is not None:
            record["traits"] = kind.traits()  # the folder says what made it (the report and card read this)
            finalize(sp, out, record, plan.base)
            print(f"[align] {sp.name}: done -> {sp.final_dir}", flush=True)


# ---------------------------------------------------------------- memory plan


def memory_plan(plan: Plan, gpus: int | None) -> dict[str, Any]:
    """Per stage: the estimate of peak bytes per GPU by component (align.memory), or why it has none."""
    from align.memory import estimate, model_shape, read_model_config

    config, where = read_model_config(plan.base.path, kind=plan.base.kind, ref=plan.base.ref)
    if config is None:
        return {"source": None, "reason": where, "stages": {}}
    try:
        shape = model_shape(config)
    except ValueError as e:
        return {"source": where, "reason": str(e), "stages": {}}
    out: dict[str, Any] = {"source": where, "n_params": shape.n_params, "stages": {}}
    for sp in plan.stages:
        inp = memory_input(plan, sp, gpus)
        out["stages"][sp.name] = {"input": {**inp.__dict__}, "bytes": estimate(shape, inp), "shape": shape}
    return out


def memory_input(plan: Plan, sp: StagePlan, gpus: int | None) -> Any:
    """What the estimate needs from a stage: its adapter, sequence length, micro batch, sharding, GPUs."""
    st = sp.stage
    info, micro, accum = plan.launches[sp.name]
    dtype = plan.recipe.model.dtype
    adapter = getattr(st, "adapter", None)
    common = {
        "dtype": "bfloat16" if dtype == "auto" else dtype,  # the estimate is for a GPU with bf16
        "micro_batch": micro,
        "grad_accum": accum,
        "n_gpus": gpus or info.num_processes,
        "sharding": info.sharding,
        "adapter": adapter.type if adapter else "full",
        "lora_r": adapter.r if adapter else 16,
        "target_modules": tuple(adapter.target_modules)
        if adapter and adapter.target_modules != "all-linear"
        else "all-linear",
    }
    return stage_of(st).memory_input(plan, sp, common)
