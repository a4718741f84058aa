"""How a stage process is started, and the plan-time checks of that launch.

The accelerate config names the hardware layout (processes, DeepSpeed/FSDP); align adds what follows from
the machine and the recipe: the mixed precision (bf16 only on a bf16 GPU with the recipe's dtype `auto` or
`bfloat16`, matching the trainer's own `bf16` flag), a free port for one-machine multi-process runs, the
multi-node rank/address from the environment, and for `multi_cpu` a torchrun start of N gloo processes.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align.errors import RecipeError
from align.resources import accelerate_config_path

DISTRIBUTED_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU", "DEEPSPEED", "FSDP")


@dataclass(frozen=True)
class LaunchInfo:
    config_name: str
    config_path: Path
    distributed_type: str
    num_processes: int  # total, over every machine
    num_machines: int
    zero_stage: int | None = None
    offload: bool = False
    deepspeed: dict[str, Any] = field(default_factory=dict)  # numeric batch fields of a DeepSpeed config
    mode: str = "accelerate"

    @property
    def fsdp(self) -> bool:
        return self.distributed_type == "FSDP"

    @property
    def cpu_processes(self) -> bool:
        return self.distributed_type == "MULTI_CPU"

    @property
    def sharding(self) -> str:
        """For the memory plan: none | zero2 | zero3 | zero3_offload | fsdp."""
        if self.fsdp:
            return "fsdp"
        if self.zero_stage == 3:
            return "zero3_offload" if self.offload else "zero3"
        return f"zero{self.zero_stage}" if self.zero_stage in (1, 2) else "none"

    def describe(self) -> str:
        return f"{self.config_name} x{self.num_processes}" if self.mode == "accelerate" else "python x1"


def auto_config(num_processes: int | None = None) -> str:
    """`auto`: one GPU or the CPU; with several processes, every GPU (multi_gpu) or N CPU processes."""
    import torch

    many = (num_processes or 1) > 1
    if torch.cuda.is_available():
        return "multi_gpu" if many else "single_gpu"
    return "multi_cpu" if many else "cpu"


def read_launch(accelerate_config: str, num_processes: int | None, mode: str = "accelerate") -> LaunchInfo:
    """Parse the accelerate config a stage would run under (its processes: the command line or recipe's
    `num_processes`, else the file's). Raises RecipeError naming the file and the fix."""
    name = auto_config(num_processes) if accelerate_config == "auto" else accelerate_config
    path = accelerate_config_path(name)
    where = "launch.accelerate_config"
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path} is not valid YAML ({str(e).splitlines()[0]}); fix or replace it", where) from None
    if not isinstance(cfg, dict) or str(cfg.get("distributed_type", "")).upper() not in DISTRIBUTED_TYPES:
        got = cfg.get("distributed_type") if isinstance(cfg, dict) else None
        raise RecipeError(
            f"{path} has no usable `distributed_type` (got {got!r}); one of {', '.join(DISTRIBUTED_TYPES)}", where
        )
    ds = cfg.get("deepspeed_config") or {}
    batch = {}
    if ds.get("deepspeed_config_file"):
        import json

        f = Path(ds["deepspeed_config_file"]).expanduser()
        if not f.is_absolute():
            f = path.parent / f
        if not f.is_file():
            raise RecipeError(f"{path} names deepspeed_config_file {f}, which does not exist", where)
        full = json.loads(f.read_text())
        ds = {**ds, "zero_stage": (full.get("zero_optimization") or {}).get("stage", ds.get("zero_stage"))}
        batch = {k: full[k] for k in _BATCH_KEYS if isinstance(full.get(k), int)}
    batch.update({k: ds[k] for k in _BATCH_KEYS if isinstance(ds.get(k), int)})
    machines = int(os.environ.get("NUM_MACHINES") or os.environ.get("SLURM_NNODES") or cfg.get("num_machines") or 1)
    procs = num_processes or (int(cfg.get("num_processes") or 1) if mode == "accelerate" else 1)
    dist = str(cfg["distributed_type"]).upper()
    offload = any(str(ds.get(k, "none")) not in ("none", "None", "") for k in _OFFLOAD_KEYS)
    return LaunchInfo(
        config_name=name if not name.endswith((".yaml", ".yml")) else path.stem,
        config_path=path,
        distributed_type=dist,
        num_processes=procs,
        num_machines=machines,
        zero_stage=int(ds["zero_stage"]) if dist == "DEEPSPEED" and ds.get("zero_stage") is not None else None,
        offload=offload,
        deepspeed=batch,
        mode=mode,
    )


_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_OFFLOAD_KEYS = ("offload_optimizer_device", "offload_param_device")


def global_batch(info: LaunchInfo, micro_batch: int, grad_accum: int) -> int:
    return micro_batch * grad_accum * info.num_processes


def mixed_precision(dtype: str) -> str:
    """The one precision rule, shared by the launcher and the trainer's `bf16`/`fp16` flags."""
    import torch

    if not torch.cuda.is_available():
        return "no"
    if dtype == "float16":
        return "fp16"
    if dtype in ("auto", "bfloat16") and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def check_launch(
    info: LaunchInfo,
    *,
    adapter_type: str | None,
    micro_batch: int,
    grad_accum: int,
    where: str,
    devices: int | None = None,
) -> tuple[list[tuple[str, str]], list[str]]:
    """(problems, notes) of running a stage under this launch. Problems fail the plan (exit 2); what a stage type
    itself cannot run under is its own check (`Stage.launch_problems`)."""
    problems: list[tuple[str, str]] = []
    notes: list[str] = []
    cfg, procs = f"{where}.launch.accelerate_config", f"{where}.launch.num_processes"
    if info.mode == "python" and info.num_processes > 1:
        problems.append((procs, "`mode: python` starts one plain process; use `mode: accelerate` for several"))
    if info.distributed_type == "NO" and info.num_processes > 1:
        problems.append(
            (
                procs,
                f"`{info.config_name}` starts one process whatever num_processes says; use `multi_cpu` "
                "(CPU) or `multi_gpu` / a DeepSpeed config (GPUs)",
            )
        )
    gpu_config = info.distributed_type in ("MULTI_GPU", "DEEPSPEED", "FSDP") or info.config_name == "single_gpu"
    if gpu_config and info.mode == "accelerate":
        have = _cuda_devices() if devices is None else devices
        per_node = max(1, info.num_processes // max(info.num_machines, 1))
        if have < per_node:
            notes.append(
                f"{where}: `{info.config_name}` wants {per_node} GPU(s) per machine, this machine has {have}"
                + ("; on CPU DeepSpeed runs with gloo (for testing)" if info.distributed_type == "DEEPSPEED" else "")
            )
    if info.fsdp and not _cuda_devices():
        problems.append(
            (cfg, "FSDP needs CUDA GPUs (accelerate does not run it on CPU); use deepspeed_zero3 or multi_cpu")
        )
    # DeepSpeed's batch fields, when numbers, must agree with the trainer's
    ds = info.deepspeed
    world = info.num_processes
    if "train_micro_batch_size_per_gpu" in ds and ds["train_micro_batch_size_per_gpu"] != micro_batch:
        problems.append(
            (
                f"{where}.train.per_device_train_batch_size",
                f"is {micro_batch} but the DeepSpeed config sets train_micro_batch_size_per_gpu="
                f'{ds["train_micro_batch_size_per_gpu"]}; make them equal or set the DeepSpeed value to "auto"',
            )
        )
    if "gradient_accumulation_steps" in ds and ds["gradient_accumulation_steps"] != grad_accum:
        problems.append(
            (
                f"{where}.train.gradient_accumulation_steps",
                f"is {grad_accum} but the DeepSpeed config sets {ds['gradient_accumulation_steps']}; make them equal "
                'or set the DeepSpeed value to "auto"',
            )
        )
    if "train_batch_size" in ds and ds["train_batch_size"] != micro_batch * grad_accum * world:
        problems.append(
            (
                f"{where}.train.per_device_train_batch_size",
                f"micro batch {micro_batch} x accumulation {grad_accum} x {world} processes = "
                f"{micro_batch * grad_accum * world}, but the DeepSpeed config sets train_batch_size="
                f'{ds["train_batch_size"]}; change one of them or set train_batch_size to "auto"',
            )
        )
    if adapter_type == "qlora" and (info.zero_stage == 3 or info.fsdp):
        problems.append(
            (
                cfg,
                "QLoRA under ZeRO-3/FSDP is refused: sharding 4-bit weights needs bnb_4bit_quant_storage set "
                "to the compute dtype and a bitsandbytes/accelerate pairing align does not test; use "
                "deepspeed_zero2 or multi_gpu with QLoRA, or `adapter.type: lora` with ZeRO-3",
            )
        )
    return problems, notes


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(path: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _unsaid_defaults(path: Path, num_processes: int, env: Mapping[str, str]) -> list[str]:
    """accelerate's own defaults, said out loud, so that it does not warn about them on every launch: dynamo off,
    and on a CPU config its threads per process (physical cores / local processes, as accelerate computes them)."""
    cfg, args = _config(path), []
    if "dynamo_config" not in cfg and "dynamo_backend" not in cfg:
        args += ["--dynamo_backend", "no"]
    if cfg.get("use_cpu") and not env.get("OMP_NUM_THREADS") and "num_cpu_threads_per_process" not in cfg:
        import psutil

        local = max(num_processes // max(int(cfg.get("num_machines") or 1), 1), 1)
        threads = int((psutil.cpu_count(logical=False) or 1) / local)
        if threads > 1:
            args += ["--num_cpu_threads_per_process", str(threads)]
    return args


def launch_command(
    info: LaunchInfo, *, dtype: str, stage_args: list[str], env: Mapping[str, str]
) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command line and environment for a stage process."""
    new_env = dict(env)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    mp = mixed_precision(dtype)
    if info.cpu_processes:
        # accelerate's CPU launcher starts one process without mpirun: start N with torchrun, GPUs hidden
        new_env["CUDA_VISIBLE_DEVICES"] = ""
        cmd += [
            "--multi_gpu",
            "--num_machines",
            "1",
            "--num_processes",
            str(info.num_processes),
            "--mixed_precision",
            "no",
            "--dynamo_backend",  # accelerate's default, said out loud: otherwise it warns on every launch
            "no",
        ]
        cmd += ["--main_process_port", str(free_port())]
        return cmd + stage_args, new_env
    cmd += ["--config_file", str(info.config_path), "--num_processes", str(info.num_processes), "--mixed_precision", mp]
    cmd += _unsaid_defaults(info.config_path, info.num_processes, env)
    if info.num_machines > 1:
        rank = env.get("MACHINE_RANK") or env.get("NODE_RANK") or env.get("SLURM_NODEID")
        addr = env.get("MAIN_PROCESS_IP") or env.get("MASTER_ADDR")
        if rank is None or not addr:
            raise RecipeError(
                f"`{info.config_name}` runs on {info.num_machines} machines: set MACHINE_RANK (or NODE_RANK / "
                "SLURM_NODEID) and MAIN_PROCESS_IP (or MASTER_ADDR) on each node",
                "launch.accelerate_config",
            )
        port = env.get("MAIN_PROCESS_PORT") or env.get("MASTER_PORT") or "29500"
        cmd += ["--num_machines", str(info.num_machines), "--machine_rank", str(rank)]
        cmd += ["--main_process_ip", addr, "--main_process_port", str(port)]
    elif info.num_processes > 1:
        cmd += ["--main_process_port", str(free_port())]  # two runs on one machine never share a port
    if info.distributed_type == "DEEPSPEED" and not _cuda_devices():
        new_env.setdefault("DS_ACCELERATOR", "cpu")
    return cmd + stage_args, new_env
