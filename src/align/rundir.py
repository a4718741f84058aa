"""The run folder: the contract between stages, and the plan types the stages read. Below every stage.

    runs/<run>/run.json           written by the orchestrator: the resolved recipe, overrides, git commit, stages
    runs/<run>/<stage>/           final, complete output (only ever replaced whole, by a rename)
        stage.json                written last: fingerprint, output artifact, output hash, timings
        config.yaml inputs.json versions.json metrics.json train_log.jsonl  + the artifact folder
    runs/<run>/.partial/<stage>/  a stage in progress: fingerprint, checkpoints/ and out/ (becomes the final folder)
    runs/<run>/.partial/<stage>.plan.json  the orchestrator's resolved plan, read by the stage processes

A stage is done when its stage.json fingerprint equals the one computed now from its config, its data's
content hashes and its input artifact's hash. Every path a run records is relative to the run (or is a
content hash), so a run folder can be moved or copied whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align import distributed
from align.data import dataset_identity, file_hash
from align.errors import AlignError, Busy, RecipeError
from align.models import ResolvedModel, locate, relocatable
from align.spec import RecipeSpec, StageSpec

# ---------------------------------------------------------------- plan types


@dataclass
class StagePlan:
    stage: StageSpec
    index: int
    inputs: list[str]  # "base" or stage names this stage reads
    final_dir: Path
    partial_dir: Path
    datasets: list[str] = field(default_factory=list)  # recipe datasets the stage reads (their hashes count)
    fingerprint: str | None = None  # None while an input is not built yet
    status: str = "pending"
    detail: str = ""

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def where(self) -> str:
        """The stage's place in the recipe, as error messages name it: `stages[1](dpo)`."""
        return f"stages[{self.index}]({self.stage.name})"


@dataclass
class Plan:
    recipe: RecipeSpec
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


def plan_record(plan: Plan) -> dict[str, Any]:
    """The plan as JSON data (what a stage process reads instead of validating the recipe again)."""
    return {
        "recipe": plan.recipe.model_dump(mode="json", by_alias=True),
        "recipe_path": str(plan.recipe_path),
        "overrides": plan.overrides,
        "run_dir": str(plan.run_dir),
        "base": {"kind": plan.base.kind, "ref": plan.base.ref, "path": str(plan.base.path) if plan.base.path else None},
        "launch": plan.launch_args(),
        "stages": [
            {
                "name": sp.name,
                "inputs": sp.inputs,
                "datasets": sp.datasets,
                "fingerprint": sp.fingerprint,
                "status": sp.status,
                "detail": sp.detail,
            }
            for sp in plan.stages
        ],
    }


def plan_from_record(rec: dict[str, Any], recipe: RecipeSpec) -> Plan:
    """Undo `plan_record`, given the recipe rebuilt from `rec["recipe"]` by the caller (who knows its schema)."""
    base = rec["base"]
    run_dir = Path(rec["run_dir"])
    plan = Plan(
        recipe,
        Path(rec["recipe_path"]),
        list(rec["overrides"]),
        run_dir,
        ResolvedModel(base["kind"], base["ref"], Path(base["path"]) if base["path"] else None),
        **rec["launch"],
    )
    for i, s in enumerate(rec["stages"]):
        st = recipe.stages[i]
        sp = StagePlan(st, i, s["inputs"], run_dir / st.name, run_dir / ".partial" / st.name, s["datasets"])
        sp.fingerprint, sp.status, sp.detail = s["fingerprint"], s["status"], s["detail"]
        plan.stages.append(sp)
    return plan


def plan_file(run_dir: Path, stage: str, node: int = 0) -> Path:
    """Outside the stage's partial folder: that folder may be wiped while ranks still read the plan."""
    return run_dir / ".partial" / (f"{stage}.plan.json" if node == 0 else f"{stage}.plan.node{node}.json")


# ---------------------------------------------------------------- reading the run folder


def read_stage_json(folder: Path) -> dict[str, Any] | None:
    f = folder / "stage.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None


def latest_checkpoint(sp: StagePlan) -> Path | None:
    """The newest checkpoint of an interrupted run of this exact stage configuration."""
    marker = sp.partial_dir / "fingerprint"
    if not marker.is_file() or marker.read_text().strip() != sp.fingerprint:
        return None
    # a checkpoint counts once the trainer wrote its state (last): a kill mid-save leaves an incomplete one
    cks = [c for c in (sp.partial_dir / "checkpoints").glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
    cks.sort(key=lambda p: int(p.name.split("-")[-1]))
    return cks[-1] if cks else None


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


# ---------------------------------------------------------------- writing the run folder


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
    inputs["data"] = {n: dataset_identity(plan.recipe.datasets[n]) for n in sp.datasets}
    (out / "inputs.json").write_text(json.dumps(inputs, indent=2))
    (out / "versions.json").write_text(json.dumps(library_versions(), indent=2))


def write_metrics(out: Path, metrics: dict[str, Any]) -> None:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))


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
                    raise Busy(
                        f"{run_dir / name} is held by another align process ({fh.read().strip() or '?'}); "
                        "wait for it or stop it"
                    ) from None
                time.sleep(1)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield
