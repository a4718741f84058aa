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
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align import __version__, distributed
from align.data import dataset_identity, file_hash
from align.errors import AlignError, RecipeError, StageFailed
from align.models import ResolvedModel, locate, relocatable, resolve_model
from align.recipe import POLICY_TYPES, AnyStage, EvalStage, OnlineRLStage, Recipe, reward_kind


@dataclass
class StagePlan:
    stage: AnyStage
    index: int
    inputs: list[str]  # "base" or stage names this stage reads
    final_dir: Path
    partial_dir: Path
    fingerprint: str | None = None  # None while an input is not built yet
    status: str = "pending"
    detail: str = ""

    @property
    def name(self) -> str:
        return self.stage.name


@dataclass
class Plan:
    recipe: Recipe
    recipe_path: Path
    overrides: list[str]
    run_dir: Path
    base: ResolvedModel
    stages: list[StagePlan] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # `align run --accelerate-config/--num-processes`: the launch of every training stage for this run
    launch_config: str | None = None
    launch_processes: int | None = None
    launches: dict[str, Any] = field(default_factory=dict)  # stage name -> (LaunchInfo, micro, accumulation)
    gpus: int | None = None  # `align plan --gpus N`: plan for N GPUs, wherever the plan is made

    def get(self, name: str) -> StagePlan:
        return next(p for p in self.stages if p.name == name)

    def launch_args(self) -> dict[str, Any]:
        return {"launch_config": self.launch_config, "launch_processes": self.launch_processes}


def default_source(recipe: Recipe, index: int) -> str:
    """A stage's model comes from the last earlier policy stage, or the base model."""
    for st in reversed(recipe.stages[:index]):
        if st.type in POLICY_TYPES:
            return st.name
    return "base"


def stage_inputs(recipe: Recipe, index: int) -> list[str]:
    st = recipe.stages[index]
    if isinstance(st, EvalStage):
        if st.targets:
            return list(st.targets)
        prev = default_source(recipe, index)
        return ["base"] if prev == "base" else ["base", prev]
    inputs = [st.source or default_source(recipe, index)]
    if isinstance(st, OnlineRLStage) and reward_kind(ref := recipe.reward_source(st)) == "stage":
        inputs.append(ref)  # the reward model is an input too: retraining it re-runs this stage
    return inputs


def base_identity(base: ResolvedModel) -> dict[str, Any]:
    if base.kind == "embedded":
        from align.models import _embedded_gguf

        return {"embedded": base.ref, "gguf_sha256": file_hash(_embedded_gguf(base.ref))}
    if base.kind == "local" and base.path is not None:
        files = sorted(f for f in base.path.iterdir() if f.suffix in {".json", ".safetensors", ".jinja"})
        return {"local_files": {f.name: file_hash(f) for f in files}}  # content, not where it lies
    return {"hub": base.ref, "snapshot": base.path.name if base.path else None}


def read_stage_json(folder: Path) -> dict[str, Any] | None:
    f = folder / "stage.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None


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
    from align.recipe import load_recipe
    from align.stages import module as stage_module
    from align.stages import plan_checks

    overrides = list(overrides or [])
    recipe = load_recipe(recipe_path, overrides)
    base = resolve_model(recipe.model.name_or_path, recipe.model.revision, materialize=materialize)
    run_dir = (Path(recipe.output_dir) / recipe.name).resolve()
    plan = Plan(recipe, Path(recipe_path).resolve(), overrides, run_dir, base)
    plan.launch_config, plan.launch_processes, plan.gpus = launch_config, launch_processes, gpus
    if base.note:
        plan.warnings.append(f"model `{base.ref}`: {base.note}")
    problems = plan_checks(plan) + (launch_checks(plan) if check_launches else [])
    if problems:
        raise RecipeError(problems)
    base_id = base_identity(base)
    for i, st in enumerate(recipe.stages):
        sp = StagePlan(st, i, stage_inputs(recipe, i), run_dir / st.name, run_dir / ".partial" / st.name)
        plan.stages.append(sp)
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
            sp.status, sp.detail = "pending", f"waits for {', '.join(s for s in sp.inputs if s != 'base')}"
            continue
        ident = {
            "align": __version__,
            "stage": st.model_dump(mode="json", by_alias=True, exclude={"launch"}),
            "model": {
                **recipe.model.model_dump(mode="json", exclude={"name_or_path", "revision", "chat_template"}),
                "chat_template_sha256": file_hash(Path(t)) if (t := recipe.model.chat_template) else None,
            },
            "seed": recipe.seed,
            "inputs": input_ids,
            "resolved": stage_module(st.type).resolved_config(plan, sp),  # align's defaults count too
            "data": {n: dataset_identity(recipe.datasets[n]) for n in sorted(_stage_datasets(st))},
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


def stage_batch(plan: Plan, sp: StagePlan) -> tuple[int, int]:
    """(micro batch per process, gradient accumulation) of a stage, after align's and the trainer's defaults."""
    from align.stages import module

    st = sp.stage
    if st.type == "eval":
        return st.batch_size, 1
    resolved = module(st.type).resolved_config(plan, sp)
    if st.type == "ppo":
        return int(resolved["batch_size"]), 1  # prompts per rollout step per process
    cls = module(st.type).TRAINER_CONFIG
    cls = cls[st.type] if isinstance(cls, dict) else cls
    fields = cls.__dataclass_fields__

    def get(key: str) -> int:
        return int(resolved[key] if key in resolved else fields[key].default)

    return get("per_device_train_batch_size"), get("gradient_accumulation_steps")


def launch_checks(plan: Plan) -> list[tuple[str, str]]:
    """Every stage's launch read and checked before anything runs; the results are kept for the plan table."""
    from align.launch import check_launch, read_launch

    problems: list[tuple[str, str]] = []
    for i, st in enumerate(plan.recipe.stages):
        sp = StagePlan(st, i, stage_inputs(plan.recipe, i), plan.run_dir / st.name, plan.run_dir / ".partial" / st.name)
        launch = effective_launch(plan, sp)
        where = f"stages[{i}]({st.name})"
        config = launch.accelerate_config
        if config == "auto" and plan.gpus:  # planned for GPUs, perhaps on a machine without one
            config = "multi_gpu" if (launch.num_processes or plan.gpus) > 1 else "single_gpu"
        try:
            info = read_launch(config, launch.num_processes, launch.mode)
        except RecipeError as e:
            from_cli = plan.launch_config is not None and st.type != "eval"
            for p, m in e.problems:
                item = ("--accelerate-config", m) if from_cli else (f"{where}.{p}", m)
                if item not in problems:
                    problems.append(item)
            continue
        micro, accum = stage_batch(plan, sp)
        found, notes = check_launch(
            info,
            stage_type=st.type,
            adapter_type=getattr(getattr(st, "adapter", None), "type", None),
            micro_batch=micro,
            grad_accum=accum,
            where=where,
        )
        problems += found
        plan.warnings += notes
        plan.launches[st.name] = (info, micro, accum)
    return problems


def _stage_datasets(st: AnyStage) -> set[str]:
    from align.recipe import _dataset_refs

    return {ref for ref, _ in _dataset_refs(st)}


def latest_checkpoint(sp: StagePlan) -> Path | None:
    """The newest checkpoint of an interrupted run of this exact stage configuration."""
    marker = sp.partial_dir / "fingerprint"
    if not marker.is_file() or marker.read_text().strip() != sp.fingerprint:
        return None
    # a checkpoint counts once the trainer wrote its state (last): a kill mid-save leaves an incomplete one
    cks = [c for c in (sp.partial_dir / "checkpoints").glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
    cks.sort(key=lambda p: int(p.name.split("-")[-1]))
    return cks[-1] if cks else None


# ---------------------------------------------------------------- orchestrator


def run(plan: Plan, *, force: set[str] = frozenset(), only: str | None = None) -> list[dict[str, Any]]:
    """Run every stage that is not done, in order, each as its own process. Returns a summary row per stage."""
    unknown = set(force) - {p.name for p in plan.stages}
    if unknown:
        raise RecipeError(f"no stage named {sorted(unknown)}", "--force")
    check_writable(plan.run_dir)
    if plan.base.path is None:  # convert the embedded model or download from the hub once, before any stage
        plan.base = resolve_model(plan.recipe.model.name_or_path, plan.recipe.model.revision, materialize=True)
    check_hub_datasets(plan)
    rows = []
    # On a multi-node run every node runs `align run` over a shared run folder: node 0 holds the run lock and
    # finalizes; the other nodes take part in each stage, then wait until node 0 has marked it done.
    node = machine_rank()
    with run_lock(plan.run_dir) if node == 0 else contextlib.nullcontext():
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
            print(f"[align] {sp.name}: running ({sp.status}{', ' + sp.detail if sp.detail else ''})", flush=True)
            if node == 0 or spans_nodes(plan, sp):
                launch_stage(plan, sp, fresh=sp.name in force)
            if node != 0:
                wait_done(sp)  # a one-machine stage (eval, say) runs on node 0 only
            # inputs may have changed, so later fingerprints are computed anew
            again = make_plan(plan.recipe_path, plan.overrides, **plan.launch_args())
            plan.stages[i + 1 :] = again.stages[i + 1 :]
            rows.append(
                {"name": sp.name, "type": sp.stage.type, "status": "ran", "ran": True, "seconds": time.time() - t0}
            )
    return rows


def machine_rank() -> int:
    """This machine's rank in a multi-node run (the variables the multi_node config documents), else 0."""
    return int(os.environ.get("MACHINE_RANK") or os.environ.get("NODE_RANK") or os.environ.get("SLURM_NODEID") or 0)


def spans_nodes(plan: Plan, sp: StagePlan) -> bool:
    from align.launch import read_launch

    launch = effective_launch(plan, sp)
    if launch is None or launch.mode == "python":
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


def launch_stage(plan: Plan, sp: StagePlan, *, fresh: bool = False) -> None:
    """Start the stage process (under `accelerate launch` by default) and wait for it."""
    launch = effective_launch(plan, sp)
    stage_args = ["-m", "align", "stage", str(plan.recipe_path), sp.name, *plan.overrides]
    if fresh:
        stage_args.append("--fresh")
    env = {**os.environ, "ALIGN_PARENT_PID": str(os.getpid())}
    if launch is None or launch.mode == "python":
        cmd = [sys.executable, *stage_args]
    else:
        from align.launch import launch_command, read_launch

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
    if code == 2:
        raise RecipeError(f"stage `{sp.name}` rejected its input (see the message above)", sp.name)
    if code != 0:
        raise StageFailed(f"stage `{sp.name}` failed (exit {code}); its partial state is in {sp.partial_dir}")


def effective_launch(plan: Plan, sp: StagePlan) -> Any:
    """The stage's `launch:` with this run's command-line launch (if any) on top; None for a plain process."""
    launch = getattr(sp.stage, "launch", None)
    if sp.stage.type == "eval" or (plan.launch_config is None and plan.launch_processes is None):
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


def check_writable(run_dir: Path) -> None:
    """Fail before any training if the run folder cannot be written."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RecipeError(
            f"cannot write the run folder {run_dir}: {e.strerror}; set `output_dir`", "output_dir"
        ) from None


@contextlib.contextmanager
def run_lock(run_dir: Path, name: str = ".lock", wait_s: float = 0) -> Iterator[None]:
    """One writer per run (or per stage): a second `align run` on the same run waits or stops clearly."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / name, "a+") as fh:
        deadline = time.time() + wait_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() >= deadline:
                    fh.seek(0)
                    raise AlignError(
                        f"{run_dir / name} is held by another align process ({fh.read().strip() or '?'}); "
                        "wait for it or stop it"
                    ) from None
                time.sleep(1)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield


# ---------------------------------------------------------------- stage process side


def finalize(sp: StagePlan, out: Path, record: dict[str, Any], plan_base: ResolvedModel) -> None:
    """Write stage.json last, then swap the finished folder into place with renames."""
    record = {**record, "fingerprint": sp.fingerprint, "output_sha256": tree_hash(out, record["output"])}
    record["output"] = relocatable(record["output"], sp.final_dir, plan_base)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    tmp = out / "stage.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.rename(out / "stage.json")
    old = sp.final_dir.with_name(f".{sp.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if sp.final_dir.exists():
        sp.final_dir.rename(old)
    out.rename(sp.final_dir)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(sp.partial_dir, ignore_errors=True)


def tree_hash(root: Path, output: dict[str, Any]) -> str:
    """Content hash of a stage's output artifact (what the next stage reads), or of its metrics."""
    target = root / output["path"] if output.get("path") else root / "metrics.json"
    files = sorted(target.rglob("*")) if target.is_dir() else [target]
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(str(f.relative_to(root)).encode())
            h.update(file_hash(f).encode())
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("align", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def write_common(sp: StagePlan, plan: Plan, out: Path, resolved: dict[str, Any]) -> None:
    """The files every stage writes: resolved config, inputs with hashes, library versions (main process)."""
    if not distributed.is_main():
        return
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(resolved.get("train_args"), dict) and "output_dir" in resolved["train_args"]:
        # the checkpoints' folder is the partial folder, gone once the stage is done
        resolved = {**resolved, "train_args": {**resolved["train_args"], "output_dir": "../checkpoints"}}
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    rel = lambda p: os.path.relpath(Path(p).resolve(), sp.final_dir.resolve())  # noqa: E731 - the run can move
    inputs: dict[str, Any] = {"model": {"kind": plan.base.kind, "ref": plan.base.ref, "path": rel(plan.base.path)}}
    for src in sp.inputs:
        if src != "base":
            info = read_stage_json(plan.get(src).final_dir) or {}
            inputs[src] = {"path": rel(plan.get(src).final_dir), "output_sha256": info.get("output_sha256")}
    inputs["data"] = {n: dataset_identity(plan.recipe.datasets[n]) for n in sorted(_stage_datasets(sp.stage))}
    (out / "inputs.json").write_text(json.dumps(inputs, indent=2))
    (out / "versions.json").write_text(json.dumps(library_versions(), indent=2))


def input_artifact(plan: Plan, src: str) -> dict[str, Any]:
    """What a stage reads from `src`: the base model folder, or an earlier stage's recorded output."""
    if src == "base":
        return {"kind": "model", "path": str(plan.base.path), "label": "base"}
    sp = plan.get(src)
    info = read_stage_json(sp.final_dir)
    if not info:
        raise AlignError(f"input stage `{src}` is not done; run the recipe with `align run`")
    art = locate(info["output"], sp.final_dir)
    art["label"] = src
    return art


def execute_stage(recipe_path: str, stage_name: str, overrides: list[str], *, fresh: bool = False) -> None:
    """The stage process: plan, take the stage lock, run the stage module, finalize on the main process.

    Under N processes the main process alone takes the lock, (re)creates the partial folder and writes its
    marker while the others wait at a barrier; every rank then runs the stage; the main process finalizes."""
    from align.stages import run_stage

    # the launch was checked by whoever launched this process (and this process is running under it)
    plan = make_plan(recipe_path, overrides, materialize=True, check_launches=False)
    sp = plan.get(plan.recipe.stage(stage_name).name)
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
        record = run_stage(plan, sp, out)
        if main and record is not None:
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
    from align.memory import StageMemoryInput
    from align.stages import module

    st = sp.stage
    info, micro, accum = plan.launches[sp.name]
    dtype = plan.recipe.model.dtype
    dtype = "bfloat16" if dtype == "auto" else dtype  # the estimate is for a GPU with bf16
    n = gpus or info.num_processes
    adapter = getattr(st, "adapter", None)
    common = {
        "stage_type": st.type,
        "dtype": dtype,
        "micro_batch": micro,
        "grad_accum": accum,
        "n_gpus": n,
        "sharding": info.sharding,
        "adapter": adapter.type if adapter else "full",
        "lora_r": adapter.r if adapter else 16,
        "target_modules": tuple(adapter.target_modules)
        if adapter and adapter.target_modules != "all-linear"
        else "all-linear",
    }
    if st.type == "eval":
        seq = max(t.max_length for t in st.tasks)
        return StageMemoryInput(**{**common, "adapter": "lora"}, seq_len=seq)
    resolved = module(st.type).resolved_config(plan, sp)
    if st.type == "ppo":
        from align.stages.ppo import MAX_PROMPT_TOKENS

        return StageMemoryInput(
            **common,
            seq_len=MAX_PROMPT_TOKENS,
            gen_tokens=int(resolved["max_new_tokens"]),
            reward_model=resolved["reward"].get("function") is None,
        )
    cls = module(st.type).TRAINER_CONFIG
    fields = (cls[st.type] if isinstance(cls, dict) else cls).__dataclass_fields__

    def get(key: str, default: Any = None) -> Any:
        return resolved[key] if key in resolved else (fields[key].default if key in fields else default)

    ac = get("activation_checkpointing")  # the new name; None means the deprecated gradient_checkpointing decides
    ckpt = bool(ac if ac is not None else get("gradient_checkpointing", False))
    if st.type in ("grpo", "rloo"):
        prompt = int(get("max_prompt_length") or 512)
        return StageMemoryInput(
            **common,
            seq_len=prompt,
            gen_tokens=int(get("max_completion_length") or 256),
            num_generations=int(get("num_generations") or 1),
            activation_checkpointing=ckpt,
            reward_model=resolved["reward"].get("function") is None,
        )
    return StageMemoryInput(**common, seq_len=int(get("max_length") or 1024), activation_checkpointing=ckpt)
