"""Memory plan vs measurement: `align plan --json` estimates each stage's peak; a short real run measures it.

Runs the quick recipes' first stages on the embedded model for a few steps (same sequence length and micro
batch as the recipe), reads `peak_memory_bytes` from each stage's metrics (CUDA max allocated on a GPU, peak
RSS of the stage process on a CPU) and prints JSON with the estimate, the measurement and their ratio.

On a CPU the estimate is made for fp32 (the dtype align trains in there) and compared with peak RSS, which
also holds the Python interpreter, torch's libraries and the tokenizer (~0.5-1 GiB that a GPU estimate's
1 GiB CUDA-context allowance stands in for): read the ratio as a sanity check of the model-side terms.

    .venv/bin/python benchmarks/memory_plan.py [--steps 4] [--out benchmarks/results/memory_plan.json]
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
CASES = [  # (recipe, stage to measure, overrides that keep it short)
    ("recipes/quickstart.yaml", "sft", ["stages.sft.train.max_steps={steps}"]),
    ("recipes/dpo_quick.yaml", "sft", ["stages.sft.train.max_steps={steps}"]),
]


def align(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "align", *args], capture_output=True, text=True, cwd=ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_plan.json"))
    args = ap.parse_args()
    import torch

    on_gpu = torch.cuda.is_available()
    rows = []
    for recipe, stage, overrides in CASES:
        out_dir = tempfile.mkdtemp(prefix="align-mem-")
        ov = [o.format(steps=args.steps) for o in overrides] + [f"output_dir={out_dir}"]
        if not on_gpu:
            ov.append("model.dtype=float32")
        plan = align("plan", recipe, *ov, "--gpus", "1", "--json")
        if plan.returncode != 0:
            rows.append({"recipe": recipe, "stage": stage, "status": "plan failed", "stderr": plan.stderr[-2000:]})
            continue
        est = next(s for s in json.loads(plan.stdout)["stages"] if s["name"] == stage)["memory"]["bytes_per_gpu"]
        t0 = time.time()
        run = align("run", recipe, *ov, "--only", stage)
        if run.returncode != 0:
            rows.append({"recipe": recipe, "stage": stage, "status": "run failed", "stderr": run.stderr[-2000:]})
            continue
        name = json.loads(plan.stdout)["run_dir"]
        metrics = json.loads((Path(name) / stage / "stage.json").read_text())["metrics"]
        measured = metrics["peak_memory_bytes"]
        model_side = est["total"] - est["overhead"]
        rows.append(
            {
                "recipe": recipe,
                "stage": stage,
                "status": "ok",
                "device": "cuda" if on_gpu else "cpu (peak RSS)",
                "estimate_bytes": est,
                "measured_peak_bytes": measured,
                "ratio_measured_to_estimate": measured / est["total"],
                "ratio_measured_to_model_side_estimate": measured / model_side,
                "steps": metrics.get("steps"),
                "seconds": round(time.time() - t0, 1),
            }
        )
    result = {"benchmark": "memory plan vs measured peak", "baseline": "align plan --json estimate", "cases": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
