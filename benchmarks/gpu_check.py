"""GPU check, ready to run on a lent machine: <= 8 minutes on one H200, JSON of whatever finished.

Parts (each with its own time limit; a part that fails or times out is recorded and the next one runs):
  env         nvidia-smi, torch/CUDA/bitsandbytes/deepspeed versions, a measured bf16 matmul peak
  single_gpu  LoRA SFT of the embedded model under `single_gpu` (bf16)
  zero2       the same SFT under `deepspeed_zero2`, one process
  zero3       the same SFT under `deepspeed_zero3`, one process (adapter gathered and verified)
  qlora       QLoRA SFT with bitsandbytes 4-bit on CUDA
For each run: s/step, tokens/s, MFU against the bf16 dense peak (datasheet and measured), peak memory
(CUDA max allocated, from the stage's metrics) against `align plan --json`'s estimate.
FLOPs per trained token: 6N for full fine-tuning; with LoRA/QLoRA ~4N (forward 2N + activation gradients 2N;
frozen weights get no weight gradient; the adapter's own FLOPs are negligible). N from the model config.

    .venv/bin/python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--budget-s 480] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
RECIPE = """\
name: gpu-{name}
model: smollm2-135m-instruct
output_dir: {out}
datasets:
  train: {{path: {data}}}
stages:
  - name: sft
    type: sft
    data: train
    adapter: {{type: {adapter}, r: 16, alpha: 32, target_modules: all-linear}}
    train: {{max_steps: {steps}, per_device_train_batch_size: 8, max_length: 512, learning_rate: 2.0e-4,
            save_steps: 1000}}
"""
RUNS = [  # name, accelerate config, adapter, per-part time limit (s)
    ("single_gpu", "single_gpu", "lora", 100),
    ("zero2", "deepspeed_zero2", "lora", 110),
    ("zero3", "deepspeed_zero3", "lora", 110),
    ("qlora", "single_gpu", "qlora", 100),
]


def sh(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run in its own process group: a timeout kills the launcher and every stage process it started."""
    import os
    import signal

    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def env_part() -> dict:
    import torch

    out: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0)}
    for pkg in ("bitsandbytes", "deepspeed", "transformers", "trl", "peft", "accelerate"):
        try:
            out[pkg] = __import__(pkg).__version__
        except Exception as e:  # noqa: BLE001
            out[pkg] = f"missing ({type(e).__name__})"
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    )
    out["nvidia_smi"] = smi.stdout.strip()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    out["measured_bf16_tflops"] = 2 * 8192**3 * n / (time.perf_counter() - t0) / 1e12
    out["datasheet_bf16_tflops"] = next((v / 1e12 for k, v in PEAK_BF16.items() if k in out["gpu"]), None)
    return out


def run_part(name: str, config: str, adapter: str, limit: float, steps: int, n_params: int | None, peaks: dict) -> dict:
    out_dir = Path(tempfile.mkdtemp(prefix=f"align-gpu-{name}-"))
    recipe = out_dir / "recipe.yaml"
    data = ROOT / "recipes" / "data" / "quickstart_train.jsonl"
    recipe.write_text(RECIPE.format(name=name, out=out_dir / "runs", data=data, adapter=adapter, steps=steps))
    launch = ["--accelerate-config", config, "--num-processes", "1"]
    plan = sh([sys.executable, "-m", "align", "plan", str(recipe), *launch, "--gpus", "1", "--json"], 60)
    estimate = None
    if plan.returncode == 0:
        estimate = json.loads(plan.stdout)["stages"][0].get("memory", {}).get("bytes_per_gpu")
    t0 = time.time()
    res = sh([sys.executable, "-m", "align", "run", str(recipe), *launch], limit)
    row: dict = {"config": config, "adapter": adapter, "wall_s": round(time.time() - t0, 1)}
    if res.returncode != 0:
        return {**row, "status": "failed", "stderr": res.stderr[-3000:]}
    m = json.loads((out_dir / "runs" / f"gpu-{name}" / "sft" / "stage.json").read_text())["metrics"]
    tok_s = m.get("tokens_per_s")
    flops_per_token = (6 if adapter == "full" else 4) * (n_params or 0)
    row.update(
        status="ok",
        steps=m["steps"],
        s_per_step=m["train_runtime_s"] / m["steps"] if m.get("train_runtime_s") else None,
        tokens_per_s=tok_s,
        flops_per_token=f"{6 if adapter == 'full' else 4} x N = {flops_per_token:.3g}",
        peak_memory_bytes=m.get("peak_memory_bytes"),
        estimate_bytes=estimate,
        measured_to_estimate=(m["peak_memory_bytes"] / estimate["total"])
        if estimate and m.get("peak_memory_bytes")
        else None,
        distributed_type=m.get("distributed_type"),
    )
    for label, peak in peaks.items():
        if peak and tok_s:
            row[f"mfu_vs_{label}"] = tok_s * flops_per_token / (peak * 1e12)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    ap.add_argument("--budget-s", type=float, default=480)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--dry-run", action="store_true", help="print the parts and commands, run nothing")
    args = ap.parse_args()
    if args.dry_run:
        for name, config, adapter, limit in RUNS:
            print(
                f"{name}: align run <temp recipe: {adapter} SFT, {args.steps} steps> --accelerate-config {config} "
                f"--num-processes 1   (limit {limit}s; plan: align plan ... --gpus 1 --json)"
            )
        return 0
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"status": "skipped", "reason": "no CUDA device"}))
        return 0
    start = time.time()
    result: dict = {"benchmark": "gpu check", "parts": {}}

    def save() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))

    try:
        result["env"] = env_part()
    except Exception as e:  # noqa: BLE001
        result["env"] = {"status": "failed", "error": repr(e)}
    from align.memory import model_shape, read_model_config
    from align.models import resolve_model

    base = resolve_model("smollm2-135m-instruct", materialize=True)
    cfg, _ = read_model_config(base.path, kind="embedded", ref=base.ref)
    n_params = model_shape(cfg).n_params if cfg else None
    result["n_params"] = n_params
    peaks = {
        "datasheet": result["env"].get("datasheet_bf16_tflops"),
        "measured": result["env"].get("measured_bf16_tflops"),
    }
    for name, config, adapter, limit in RUNS:
        left = args.budget_s - (time.time() - start)
        if left < 30:
            result["parts"][name] = {"status": "skipped", "reason": "time budget spent"}
            continue
        try:
            result["parts"][name] = run_part(name, config, adapter, min(limit, left), args.steps, n_params, peaks)
        except subprocess.TimeoutExpired:
            result["parts"][name] = {"status": "timeout", "limit_s": min(limit, left)}
        save()
    result["total_s"] = round(time.time() - start, 1)
    save()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
