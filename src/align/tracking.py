"""Experiment trackers. `train.report_to` (tensorboard, wandb, mlflow, trackio, ... as transformers names them)
passes through to every TRL trainer and to align's own PPO (through accelerate's trackers). One recipe run is one
group: the run folder's name is wandb's run group, MLflow's experiment and trackio's project, and TensorBoard
writes under `runs/<run>/tensorboard/<stage>/`; each stage is a run named after the stage.

The tracker's own settings (WANDB_PROJECT, WANDB_MODE, MLFLOW_TRACKING_URI, ...) come from the environment as
usual; align sets only what the user has not.
"""

from __future__ import annotations

import os
from typing import Any

Problem = tuple[str, str]

# report_to values transformers knows (its integration_utils), and the package each needs
PACKAGES = {
    "azure_ml": "azureml-core",
    "clearml": "clearml",
    "codecarbon": "codecarbon",
    "comet_ml": "comet-ml",
    "dagshub": "dagshub",
    "dvclive": "dvclive",
    "flyte": "flytekit",
    "mlflow": "mlflow",
    "neptune": "neptune",
    "swanlab": "swanlab",
    "tensorboard": "tensorboard (or tensorboardX)",
    "trackio": "trackio",
    "wandb": "wandb",
}
# what align's PPO can log to (accelerate's trackers)
PPO_TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "clearml", "dvclive", "swanlab")


def backends(report_to: Any) -> list[str]:
    """`none`, one name, a comma list or a list -> the names (`all`: every installed one)."""
    if report_to is None:
        return []
    names = report_to if isinstance(report_to, list | tuple) else str(report_to).split(",")
    names = [str(n).strip() for n in names if str(n).strip()]
    if names in (["none"], []):
        return []
    if "all" in names:
        return installed()
    return names


def installed() -> list[str]:
    from transformers.integrations import get_available_reporting_integrations

    return list(get_available_reporting_integrations())


def check(report_to: Any, where: str, *, ppo: bool = False) -> list[Problem]:
    """Plan time: every tracker named is one transformers knows, and is installed here."""
    if isinstance(report_to, list | tuple) and any(not isinstance(n, str) for n in report_to):
        return [(where, f"`report_to` takes tracker names, got {report_to!r}")]
    if report_to is not None and not isinstance(report_to, str | list | tuple):
        return [(where, f"`report_to` takes a tracker name or a list of them, got {report_to!r}")]
    names = backends(report_to)
    problems: list[Problem] = []
    unknown = [n for n in names if n not in PACKAGES]
    if unknown:
        return [(where, f"unknown tracker {unknown}; one of none, all, {', '.join(sorted(PACKAGES))}")]
    have = set(installed())
    for n in names:
        if n not in have:
            problems.append((where, f"tracker `{n}` is not installed: `pip install {PACKAGES[n]}`, or drop it"))
        elif ppo and n not in PPO_TRACKERS:
            problems.append((where, f"align's PPO logs to {', '.join(PPO_TRACKERS)}, not `{n}`"))
    return problems


def group(run_dir: Any) -> str:
    return os.path.basename(os.fspath(run_dir))


def environ(run_dir: Any, stage: str, report_to: Any) -> dict[str, str]:
    """Environment for the trackers of one stage (only what is not set already)."""
    names, env = backends(report_to), {}
    if "tensorboard" in names:
        env["TENSORBOARD_LOGGING_DIR"] = os.path.join(os.fspath(run_dir), "tensorboard", stage)
    if "wandb" in names:
        env["WANDB_RUN_GROUP"] = group(run_dir)
        env["WANDB_PROJECT"] = "align"
    if "mlflow" in names:
        env["MLFLOW_EXPERIMENT_NAME"] = group(run_dir)
    return {k: v for k, v in env.items() if k not in os.environ}


def apply(run_dir: Any, stage: str, report_to: Any) -> None:
    os.environ.update(environ(run_dir, stage, report_to))


def trainer_fields(config_cls: type, run_dir: Any, stage: str, report_to: Any, given: dict[str, Any]) -> dict:
    """Trainer arguments naming the run (the stage) and its group, unless the recipe set them."""
    if not backends(report_to):
        return {}
    import dataclasses

    fields = {f.name for f in dataclasses.fields(config_cls)}
    out: dict[str, Any] = {}
    if "run_name" in fields and "run_name" not in given:
        out["run_name"] = stage
    if "project" in fields and "project" not in given:  # trackio's project
        out["project"] = group(run_dir)
    return out


def ppo_trackers(run_dir: Any, stage: str, report_to: Any) -> list[Any] | None:
    """align's PPO: accelerate trackers with the same names, group and folders as the TRL stages' (None: none)."""
    names = backends(report_to)
    if not names:
        return None
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    apply(run_dir, stage, report_to)
    out: list[Any] = []
    for n in names:
        if n == "tensorboard":
            out.append(TensorBoardTracker(stage, os.path.join(os.fspath(run_dir), "tensorboard")))
        elif n == "wandb":
            out.append(WandBTracker(os.environ.get("WANDB_PROJECT", "align"), group=group(run_dir), name=stage))
        elif n == "mlflow":
            out.append(MLflowTracker(experiment_name=group(run_dir), run_name=stage))
        elif n == "trackio":
            out.append(TrackioTracker(group(run_dir), name=stage))
        else:
            out.append(n)  # accelerate builds it, with the stage as its project
    return out


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a log record (a tracker takes scalars)."""
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
