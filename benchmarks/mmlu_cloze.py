"""MMLU in the cloze format on the embedded model, beside the figure its model card publishes.

SmolLM2-135M-Instruct's card reports "MMLU (cloze)" 29.3: answer texts scored as continuations of
`Question: ...\\nAnswer:`, length-normalised, zero-shot, over all 57 subjects. This runs align's shipped
`mmlu_shared5_cloze` task (lm-eval's `mmlu_continuation` prompt, `acc_norm`) through `align eval` on the embedded
model, with `--fewshot` shots (0 by default, as the card), on the subjects that are here (../shared/data/mmlu: 5 of
the 57), and prints both figures with how many questions each covers. The two need not match: 5 subjects are not
57, and the card's harness and model precision may differ; the figure is what a user reproduces with align.

    .venv/bin/python benchmarks/mmlu_cloze.py [--fewshot 0] [--limit N] > benchmarks/results/mmlu_cloze.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {
    "value": 29.3,
    "questions": 14042,
    "subjects": 57,
    "shots": 0,
    "source": "SmolLM2-135M-Instruct model card",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fewshot", type=int, default=0)
    ap.add_argument("--limit", type=int, help="first N questions per subject (default: all)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()

    data = (ROOT / ".." / "shared" / "data" / "mmlu").resolve()
    if not data.is_dir():
        sys.exit(f"no MMLU data at {data}")
    task = yaml.safe_load((ROOT / "src" / "align" / "configs" / "tasks" / "mmlu_shared5_cloze.yaml").read_text())
    task["data"]["path"] = str(data)
    task["mmlu"]["num_fewshot"] = args.fewshot
    task["name"] = f"mmlu_shared5_cloze_{args.fewshot}shot"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{task['name']}.yaml"
        path.write_text(yaml.safe_dump(task, sort_keys=False))
        cmd = [sys.executable, "-m", "align", "eval", args.model, "--tasks", str(path), "--out", f"{tmp}/out"]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if res.returncode != 0:
            sys.exit(res.stdout[-3000:] + res.stderr[-3000:])
        metrics = json.loads((Path(tmp) / "out" / "metrics.json").read_text())
    overall = next(r for r in metrics["results"] if r["task"] == task["name"])
    per_subject = {
        r["task"].split("/", 1)[1]: {"accuracy": r["value"], "n": r["n"]}
        for r in metrics["results"]
        if r["task"].startswith(task["name"] + "/")
    }
    print(
        json.dumps(
            {
                "model": args.model,
                "format": "cloze (lm-eval mmlu_continuation prompt, acc_norm: log-likelihood / answer characters)",
                "shots": args.fewshot,
                "align": {
                    "accuracy": overall["value"],
                    "stderr": overall["stderr"],
                    "questions": overall["n"],
                    "subjects": len(per_subject),
                },
                "published": PUBLISHED,
                "per_subject": per_subject,
                "seconds_end_to_end": round(seconds, 1),
                "versions": metrics.get("versions"),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
