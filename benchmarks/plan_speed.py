"""`align plan` on the largest shipped recipe: cold (every data row read and checked) against warm (the full-file
checks answered from the on-disk cache, keyed by content), side by side in one run, each in a fresh process as a
user runs it. The baseline is the cold plan; the figure to watch is how much of a re-plan the cache saves.

    .venv/bin/python benchmarks/plan_speed.py [--recipe recipes/rlhf_quick.yaml] [--reps 3]

Prints JSON: seconds per plan (median of reps), the data rows and bytes the recipe's local datasets hold, and
warm/cold. Both sides pay the same interpreter and import start-up (`python -c 'import align.cli'`, measured
alone as `startup_s`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/rlhf_quick.yaml")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    from align.data import data_files, is_local
    from align.recipe import load_recipe

    recipe = load_recipe(ROOT / args.recipe, [])
    files = [f for d in recipe.datasets.values() if is_local(d.path) for f in data_files(d.path)]
    rows = sum(sum(1 for _ in f.open("rb")) for f in files if f.suffix == ".jsonl")
    size = sum(f.stat().st_size for f in files)

    plan = [sys.executable, "-m", "align", "plan", args.recipe]
    cold, warm = [], []
    for _ in range(args.reps):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "ALIGN_CACHE": cache}
            cold.append(timed(plan, env))  # an empty cache: every row read
            warm.append(timed(plan, env))  # the same files again: answered by content hash
    startup = statistics.median(timed([sys.executable, "-c", "import align.cli"], dict(os.environ)) for _ in range(3))
    out = {
        "recipe": args.recipe,
        "datasets": len(recipe.datasets),
        "local_files": len(files),
        "jsonl_rows": rows,
        "data_bytes": size,
        "reps": args.reps,
        "startup_s": round(startup, 3),
        "cold_plan_s": round(statistics.median(cold), 3),
        "warm_plan_s": round(statistics.median(warm), 3),
        "baseline": "cold_plan_s",
        "warm_over_cold": round(statistics.median(warm) / statistics.median(cold), 3),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
