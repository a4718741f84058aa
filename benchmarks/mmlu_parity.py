"""MMLU parity and speed: lm-evaluation-harness vs ``align.evaluation.mmlu``, side by side.

lm-eval runs in its own venv (``.venv-lmeval``) as a subprocess, on local task YAMLs that
``include`` lm-eval's *own* per-subject ``mmlu`` default configs (so description, doc_to_text,
few-shot sampler are lm-eval's) and only swap the dataset for local JSONL files
(``dataset_path: json``, ``data_files``) converted from the shared MMLU CSVs. A group over those
tasks with ``weight_by_size`` gives lm-eval's aggregate and pooled stderr. ``--log_samples``
provides per-question log-likelihoods, compared with align's.

Prints one JSON object: per-question agreement, prompt/loglik agreement, accuracies with stderr,
questions/s (scoring only and end to end) for both, and the speedup.

Example (from the project root)::

    PYTHONPATH=src .venv/bin/python benchmarks/mmlu_parity.py --model /tmp/smol --limit 20 \
        --out runs/mmlu_parity.json

``--reuse-lmeval DIR`` re-reads a previous lm-eval output folder instead of re-running it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = [
    "abstract_algebra",
    "college_biology",
    "computer_security",
    "high_school_geography",
    "marketing",
]
GROUP = "align_parity_mmlu"


def _lmeval_pkg_dir(python: str) -> Path:
    out = subprocess.run(
        [python, "-c", "import lm_eval, os; print(os.path.dirname(lm_eval.__file__))"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def _write_tasks(data: dict, work: Path, lmeval_dir: Path) -> Path:
    """cais/mmlu-style JSONL per subject + task YAMLs including lm-eval's own subject configs."""
    inc = work / "tasks"
    inc.mkdir(parents=True, exist_ok=True)
    names = []
    for name, subj in data.items():
        files = {}
        for split, rows in (("test", subj.test), ("dev", subj.dev)):
            path = work / "data" / f"{name}_{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", encoding="utf-8") as f:
                for q in rows:
                    rec = {
                        "question": q.question,
                        "subject": name,
                        "choices": list(q.choices),
                        "answer": q.answer,
                    }
                    f.write(json.dumps(rec) + "\n")
            files[split] = str(path)
        base = lmeval_dir / "tasks" / "mmlu" / "default" / f"mmlu_{name}.yaml"
        if not base.is_file():
            raise FileNotFoundError(f"lm-eval has no default mmlu config for {name}: {base}")
        task = f"{GROUP}_{name}"
        names.append(task)
        (inc / f"{task}.yaml").write_text(
            json.dumps(  # JSON is valid YAML and avoids quoting pitfalls
                {
                    "include": str(base),
                    "task": task,
                    "task_alias": name,
                    "tag": [],
                    "dataset_path": "json",
                    "dataset_name": None,
                    "dataset_kwargs": {"data_files": files},
                },
                indent=1,
            )
        )
    (inc / f"{GROUP}.yaml").write_text(
        json.dumps(
            {
                "group": GROUP,
                "task": names,
                "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
                "metadata": {"version": 1},
            },
            indent=1,
        )
    )
    return inc


def _thread_env(args: argparse.Namespace) -> dict[str, str]:
    """Same CPU thread count for both tools (set before torch starts in each subprocess)."""
    if not args.threads:
        return {}
    return {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}


def _run_lmeval(args: argparse.Namespace, inc: Path, out_dir: Path) -> dict:
    cmd = [
        args.lmeval_python,
        "-m",
        "lm_eval",
        "run",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={args.model},dtype=float32",
        "--tasks",
        GROUP,
        "--include_path",
        str(inc),
        "--num_fewshot",
        str(args.num_fewshot),
        "--batch_size",
        str(args.lmeval_batch_size),
        "--device",
        args.device,
        "--log_samples",
        "--output_path",
        str(out_dir),
    ]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    env = {**os.environ, **_thread_env(args), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    print("lm-eval:", " ".join(cmd), file=sys.stderr, flush=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    (out_dir / "lmeval_stderr.log").write_text(proc.stderr)
    (out_dir / "lmeval_stdout.log").write_text(proc.stdout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"lm-eval failed (rc={proc.returncode}); logs in {out_dir}")
    # scoring-only time: the final "Running loglikelihood requests" tqdm line
    bars = re.findall(r"Running loglikelihood requests: 100%.*?\[(\d+:)?(\d+):(\d+)<", proc.stderr)
    scoring = None
    if bars:
        h, m, s = bars[-1]
        scoring = int(h[:-1] or 0) * 3600 + int(m) * 60 + int(s)
    timing = {
        "wall_seconds": wall,
        "scoring_seconds": scoring,
        "command": cmd,
        "loadavg_1m_before_after": [load_before[0], load_after[0]],
    }
    (out_dir / "timing.json").write_text(json.dumps(timing, indent=1))
    return timing


def _read_lmeval(out_dir: Path) -> tuple[dict, dict]:
    results_files = sorted(out_dir.rglob("results_*.json"))
    if not results_files:
        raise FileNotFoundError(f"no lm-eval results_*.json under {out_dir}")
    results = json.loads(results_files[-1].read_text())
    samples = {}
    for f in out_dir.rglob("samples_*.jsonl"):
        task = re.match(r"samples_(.+)_\d{4}-\d\d-\d\dT.*\.jsonl", f.name).group(1)
        subject = task.removeprefix(f"{GROUP}_")
        samples[subject] = {}
        for line in f.read_text().splitlines():
            s = json.loads(line)
            samples[subject][s["doc_id"]] = s
    return results, samples


def _align_worker(args: argparse.Namespace, limit: int | None) -> None:
    """Child process: load model + data, run evaluate_mmlu, dump the result as JSON."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.evaluation.mmlu import evaluate_mmlu, load_mmlu

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device)
    data = load_mmlu(args.data, args.subjects, limit=limit)
    t0 = time.perf_counter()
    res = evaluate_mmlu(model, tok, data, num_fewshot=args.num_fewshot, batch_size=args.batch_size, device=args.device)
    out = {
        "result": res.to_dict(),
        "evaluate_call_seconds": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(),
    }
    Path(args._align_worker).write_text(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="embedded name or HF causal LM folder")
    ap.add_argument("--data", default=str(ROOT / "../shared/data/mmlu"))
    ap.add_argument("--subjects", nargs="+", default=SUBJECTS)
    ap.add_argument("--limit", type=int, default=20, help="test questions per subject (0 = all)")
    ap.add_argument("--num-fewshot", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16, help="align batch size")
    ap.add_argument("--lmeval-batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="OMP/MKL threads for both runs (default: torch's choice)")
    ap.add_argument("--lmeval-python", default=str(ROOT / ".venv-lmeval/bin/python"))
    ap.add_argument("--workdir", default=None, help="keep lm-eval inputs/outputs here")
    ap.add_argument("--reuse-lmeval", default=None, help="existing lm-eval output folder")
    ap.add_argument("--repeats", type=int, default=1, help="alternate both runs N times, report the fastest")
    ap.add_argument("--out", default=None, help="also write the JSON report here")
    ap.add_argument("--_align-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not Path(args.model).is_dir():  # an embedded name: the cached safetensors folder (converted once)
        sys.path.insert(0, str(ROOT / "src"))
        from align.models import resolve_model

        args.model = str(resolve_model(args.model, materialize=True).path)

    t_start = time.perf_counter()
    limit = args.limit or None
    if args._align_worker:
        _align_worker(args, limit)
        return
    sys.path.insert(0, str(ROOT / "src"))
    from align.evaluation.mmlu import MMLUPrediction, MMLUResult, Score, build_prompt, load_mmlu

    full = load_mmlu(args.data, args.subjects)  # lm-eval gets the full files, --limit cuts
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mmlu_parity_"))
    work.mkdir(parents=True, exist_ok=True)
    inc = None if args.reuse_lmeval else _write_tasks(full, work, _lmeval_pkg_dir(args.lmeval_python))
    # lm-eval and align alternate `--repeats` times; the fastest run of each is reported, which
    # filters out noise from other processes on a shared machine (all runs are listed too)
    lm_runs, align_runs = [], []
    for r in range(args.repeats):
        if args.reuse_lmeval:
            lm_out = Path(args.reuse_lmeval)
            lm_runs = [json.loads((lm_out / "timing.json").read_text())]
        else:
            lm_out = work / f"lmeval_out_{r}"
            lm_out.mkdir(parents=True, exist_ok=True)
            lm_runs.append(_run_lmeval(args, inc, lm_out))
        # align as a subprocess too, so "total" is end to end (interpreter, imports, model load)
        align_json = work / f"align_result_{r}.json"
        cmd = [sys.executable, __file__, "--_align-worker", str(align_json), *sys.argv[1:]]
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, **_thread_env(args), "PYTHONPATH": str(ROOT / "src")})
        total = time.perf_counter() - t0
        worker = json.loads(align_json.read_text())
        align_runs.append(
            {
                "total_seconds": total,
                "scoring_seconds": worker["result"]["seconds"],
                "evaluate_call_seconds": worker["evaluate_call_seconds"],
                "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]],
            }
        )
    lm_results, lm_samples = _read_lmeval(lm_out)
    res = MMLUResult(
        per_subject={k: Score(**v) for k, v in worker["result"]["per_subject"].items()},
        aggregate=Score(**worker["result"]["aggregate"]),
        predictions=[
            MMLUPrediction(p["subject"], p["index"], tuple(p["loglikelihoods"]), p["prediction"], p["answer"])
            for p in worker["result"]["predictions"]
        ],
        num_fewshot=worker["result"]["num_fewshot"],
        seconds=worker["result"]["seconds"],
    )
    data = load_mmlu(args.data, args.subjects, limit=limit)
    align_total = min(r["total_seconds"] for r in align_runs)
    align_scoring = min(r["scoring_seconds"] for r in align_runs)
    align_call = min(r["evaluate_call_seconds"] for r in align_runs)
    lm_wall = min(t["wall_seconds"] for t in lm_runs)
    scorings = [t["scoring_seconds"] for t in lm_runs if t["scoring_seconds"]]
    lm_scoring = min(scorings) if scorings else None
    timing = lm_runs[-1]

    # ---- per-question comparison
    n = agree = prompt_same = 0
    max_diff = 0.0
    disagreements = []
    for p in res.predictions:
        s = lm_samples[p.subject][p.index]
        lls = [float(r[0]) for r in s["filtered_resps"]]
        lm_pred = max(range(4), key=lambda c: (lls[c], -c))
        ctx = s["arguments"]["gen_args_0"]["arg_0"]
        subj = data[p.subject]
        prompt_same += ctx == build_prompt(subj, subj.test[p.index], args.num_fewshot)
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(lls, p.loglikelihoods, strict=True)))
        n += 1
        if lm_pred == p.prediction:
            agree += 1
        else:
            disagreements.append({"subject": p.subject, "index": p.index, "lm_eval": lls, "align": p.loglikelihoods})
    if n != sum(len(v) for v in lm_samples.values()):
        raise SystemExit("lm-eval and align scored different question sets")

    lm_res = lm_results["results"]
    lm_per = {
        sub: {
            "accuracy": lm_res[f"{GROUP}_{sub}"]["acc,none"],
            "stderr": lm_res[f"{GROUP}_{sub}"]["acc_stderr,none"],
        }
        for sub in args.subjects
    }
    lm_agg = {"accuracy": lm_res[GROUP]["acc,none"], "stderr": lm_res[GROUP]["acc_stderr,none"]}
    report = {
        "model": args.model,
        "subjects": args.subjects,
        "limit_per_subject": limit,
        "num_fewshot": args.num_fewshot,
        "n_questions": n,
        "device": args.device,
        "cpu_count": os.cpu_count(),
        "torch_threads": worker["torch_threads"],
        "agreement_pct": 100 * agree / n,
        "prompt_identical_pct": 100 * prompt_same / n,
        "max_abs_loglik_diff": max_diff,
        "disagreements": disagreements,
        "lm_eval": {
            "version": "0.4.13",
            "batch_size": args.lmeval_batch_size,
            "per_subject": lm_per,
            "aggregate": lm_agg,
            "scoring_seconds": lm_scoring,
            "total_seconds": lm_wall,
            "questions_per_s_scoring": n / lm_scoring if lm_scoring else None,
            "questions_per_s_total": n / lm_wall,
            "command": " ".join(timing["command"]),
            "runs": [{k: v for k, v in t.items() if k != "command"} for t in lm_runs],
        },
        "align": {
            "batch_size": args.batch_size,
            "per_subject": {k: {"accuracy": s.accuracy, "stderr": s.stderr} for k, s in res.per_subject.items()},
            "aggregate": {"accuracy": res.aggregate.accuracy, "stderr": res.aggregate.stderr},
            "scoring_seconds": align_scoring,
            "evaluate_call_seconds": align_call,  # + tokenization / planning
            "total_seconds": align_total,
            "questions_per_s_scoring": n / align_scoring,
            "questions_per_s_total": n / align_total,
            "runs": align_runs,
        },
        "accuracy_diff_points": 100 * (res.aggregate.accuracy - lm_agg["accuracy"]),
        "speedup_scoring": (lm_scoring / align_scoring) if lm_scoring else None,
        "speedup_total": lm_wall / align_total,
        "timing_note": f"fastest of {len(align_runs)} alternating run(s) per tool",
        "lmeval_output": str(lm_out),
        "benchmark_seconds": time.perf_counter() - t_start,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
