"""Score outputs against a generation task's references with the task's metrics; `align score`.

:func:`score_outputs` is the one place a task's ``metric:`` list (BLEU, chrF, chrF++, ROUGE) becomes
numbers, for generated outputs and saved ones alike. `align score TASK --predictions FILE` scores
outputs saved anywhere (another tool, an API, an earlier run) without loading a model, and writes the
metrics.json / summary.md an eval stage writes, so `align compare` can gate them like any evaluation.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from align.errors import RecipeError

PREDICTION_FIELD = "prediction"
PREDICTION_SUFFIXES = (".jsonl", ".txt")


def score_outputs(spec: Any, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Every metric of ``spec`` (a generation :class:`~align.evaluation.tasks.TaskSpec`) on the outputs.

    Returns ``{metric, score, metrics, details, n}``: ``metric``/``score`` the headline (the first
    metric listed; ROUGE-L for rouge), ``metrics`` every reported value by name (``bleu``, ``chrf``,
    ``chrf++``, ``rouge1``...), ``details`` each metric's full result (sacrebleu signature, BLEU
    precisions, per-item ROUGE). The ROUGE means are also top-level keys, as ``run_task`` returned them.
    Raises ValueError for unusable inputs (no items, a None reference) or a metric that cannot run.
    """
    from align.evaluation.generation import ROUGE_TYPES, bleu, chrf, missing_metric_packages, rouge

    missing = missing_metric_packages(spec.metrics)
    if missing:
        raise ValueError("; ".join(missing))
    values: dict[str, float] = {}
    details: dict[str, Any] = {}
    headline: float | None = None
    for m in spec.metrics:
        if m.name == "bleu":
            d = bleu(
                hypotheses,
                references,
                tokenize=m.tokenize,
                lowercase=m.lowercase,
                smooth_method=m.smooth_method,
                effective_order=m.effective_order,
            )
            values["bleu"] = d["score"]
            first = d["score"]
        elif m.name in ("chrf", "chrf++"):
            d = chrf(hypotheses, references, word_order=m.word_order, lowercase=m.lowercase, whitespace=m.whitespace)
            values[m.name] = d["score"]
            first = d["score"]
        elif m.name == "rouge":
            d = rouge(
                hypotheses,
                references,
                rouge_types=m.rouge_types,
                use_stemmer=m.use_stemmer,
                tokenizer=m.tokenizer,
                sentence_split=m.sentence_split,
            )
            values.update({t: d[t] for t in ROUGE_TYPES if t in m.rouge_types})
            first = d.get("rougeL", d[m.rouge_types[0]])
            d = {"tokenizer": m.tokenizer, "use_stemmer": m.use_stemmer, **d}
        else:
            raise ValueError(f"metric {m.name!r} does not score generated text")
        details[m.name] = d
        headline = first if headline is None else headline
    if headline is None:
        raise ValueError(f"task {spec.name!r} names no metric")
    rouge_means = {t: values[t] for t in ROUGE_TYPES if t in values}
    return {
        "metric": spec.metrics[0].name,
        "score": headline,
        **rouge_means,
        "metrics": values,
        "details": details,
        "n": len(hypotheses),
    }


def generation_records(res: dict[str, Any]) -> list[dict[str, Any]]:
    """metrics.json records of a generation result (``{task, version}`` + :func:`score_outputs`),
    one per reported value, in the task's order; sacrebleu metrics carry their signature."""
    base = {"task": res["task"], "task_version": res["version"], "n": res["n"], "higher_is_better": True}
    signature = {k: d.get("signature") for k, d in res["details"].items()}
    return [
        {**base, "metric": k, "value": v, "stderr": None, **({"signature": signature[k]} if signature.get(k) else {})}
        for k, v in res["metrics"].items()
    ]


def read_predictions(path: Path) -> list[str]:
    """Outputs in item order: ``.jsonl`` with a ``prediction`` string per line (blank lines skipped),
    or ``.txt`` with one output per line (an empty line is an empty output). RecipeError naming the
    file and line otherwise."""
    where = "--predictions"
    if not path.exists():
        raise RecipeError(f"{path}: no such file", where)
    if not path.is_file():
        raise RecipeError(f"{path} is not a file", where)
    suffix = path.suffix.lower()
    if suffix not in PREDICTION_SUFFIXES:
        raise RecipeError(
            f"{path}: expected .jsonl (a `{PREDICTION_FIELD}` field per line) or .txt (one output per line)", where
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path} is not UTF-8 text ({e})", where) from None
    if not text.strip():
        raise RecipeError(f"{path} is empty: no predictions", where)
    if suffix == ".txt":
        lines = text.split("\n")  # not splitlines(): it also splits on \u2028, \x0c... inside an output
        if lines[-1] == "":
            lines.pop()
        return [line.removesuffix("\r") for line in lines]
    out = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})", where) from None
        if not isinstance(rec, dict):
            raise RecipeError(
                f"{path}:{n}: expected a JSON object with a `{PREDICTION_FIELD}` field, got {type(rec).__name__}",
                where,
            )
        if PREDICTION_FIELD not in rec:
            hint = (
                " (an eval stage's predictions.jsonl holds one `predictions` list per target; write one "
                f'{{"{PREDICTION_FIELD}": ...}} line per item)'
                if isinstance(rec.get("predictions"), list)
                else ""
            )
            raise RecipeError(
                f"{path}:{n}: no `{PREDICTION_FIELD}` field (has: {', '.join(rec) or 'none'}){hint}", where
            )
        value = rec[PREDICTION_FIELD]
        if not isinstance(value, str):
            got = "null" if value is None else type(value).__name__
            raise RecipeError(f"{path}:{n}: `{PREDICTION_FIELD}` must be a string, got {got}", where)
        out.append(value)
    return out


def write_outputs(
    results: list[dict[str, Any]], out: Path, *, processes: int = 1, peak_memory_bytes: int | None = None
) -> str:
    """metrics.json, summary.md and comparison.png of an evaluation (an eval stage, `align eval`, `align score`);
    returns the table. Scoring saved outputs loads no model: ``peak_memory_bytes`` is null there."""
    from align.evaluation.compare import SCHEMA
    from align.evaluation.plot import plot_results
    from align.rundir import library_versions

    out.mkdir(parents=True, exist_ok=True)
    metrics = {
        "schema": SCHEMA,
        "versions": library_versions(),
        "processes": processes,
        "peak_memory_bytes": peak_memory_bytes,
        "results": results,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    table = summary_table(results)
    (out / "summary.md").write_text(table)
    plot_results(results, out / "comparison.png")
    return table


def summary_table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per task/metric, one column per target, plus the change from the first target."""
    targets = list(dict.fromkeys(r["target"] for r in results))
    keys = list(dict.fromkeys(f"{r['task']}/{r['metric']}" for r in results))
    value = {(r["target"], f"{r['task']}/{r['metric']}"): r["value"] for r in results}
    multi = len(targets) > 1
    lines = [
        "| metric | " + " | ".join(targets) + (" | change |" if multi else " |"),
        "|" + "---|" * (len(targets) + 1 + multi),
    ]
    for k in keys:
        vals = [value.get((t, k)) for t in targets]
        cells = " | ".join(f"{v:.3f}" if v is not None else "-" for v in vals)
        change = ""
        if multi and vals[0] and vals[-1] is not None:
            change = f" {100 * (vals[-1] - vals[0]) / vals[0]:+.1f}% |"
        lines.append(f"| {k} | {cells} |{change}")
    return "\n".join(lines) + "\n"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `align score` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "score",
        help="score saved outputs against a generation task's references (no model loaded)",
        description="Score outputs saved elsewhere with TASK's metrics (BLEU, chrF, chrF++, ROUGE) and write the "
        "metrics.json and summary.md an eval stage writes (gate them with `align compare`). FILE: .jsonl with a "
        "`prediction` string per line, or .txt with one output per line, in the task's item order. "
        "Exit 2 on unusable input.",
    )
    p.add_argument("task", metavar="TASK", help="a task name in evaluation/tasks/ or a task YAML path")
    p.add_argument("--predictions", required=True, metavar="FILE", help="the outputs, one per task item, in order")
    p.add_argument("--out", default="runs/score", help="folder for metrics.json, summary.md (default runs/score)")
    p.add_argument("--limit", type=int, help="score the task's first N items (as `align eval --limit`)")
    p.add_argument("--label", help="name of the outputs in the table and metrics.json (default: FILE's name)")
    return p


def _load_task(name: str, limit: int | None) -> Any:
    from align.evaluation.tasks import load_task as load_task_spec

    if limit is not None and limit < 1:
        raise RecipeError(f"must be at least 1 (got {limit})", "--limit")
    try:
        spec = load_task_spec(name)
    except (FileNotFoundError, ValueError) as e:
        raise RecipeError(str(e), "TASK") from None
    if spec.type != "generation":
        raise RecipeError(
            f"task `{spec.name}` is a {spec.type} task; align score scores generation tasks (bleu, chrf, rouge)",
            "TASK",
        )
    from align.evaluation.generation import missing_metric_packages

    missing = missing_metric_packages(spec.metrics)  # before any data is read: one line each, with the pip command
    if missing:
        raise RecipeError([("metric", m) for m in missing])
    return spec.model_copy(update={"limit": limit or spec.limit})


def main(args: argparse.Namespace) -> int:
    """`align score`: RecipeError (exit 2 through the CLI) for any unusable input, before writing anything."""
    from align.evaluation.tasks import load_generation_items
    from align.resources import data_root

    problems: list[tuple[str, str]] = []
    spec = predictions = None
    path = Path(args.predictions)
    for step in ("task", "predictions"):
        try:
            if step == "task":
                spec = _load_task(args.task, args.limit)
            else:
                predictions = read_predictions(path)
        except RecipeError as e:
            problems += e.problems
    if problems:
        raise RecipeError(problems)
    try:
        _, references = load_generation_items(spec, data_root(spec.data.path))
    except (FileNotFoundError, ValueError) as e:  # the message names the task or the data file and line
        raise RecipeError(str(e), "TASK") from None
    if len(predictions) != len(references):
        limit = f" (its limit: {spec.limit})" if spec.limit else ""
        raise RecipeError(
            f"{path} has {len(predictions)} predictions but task `{spec.name}` has {len(references)} items{limit}; "
            "one output per item, in order (--limit N scores the first N items)",
            "--predictions",
        )
    try:
        res = {"task": spec.name, "version": spec.version, **score_outputs(spec, predictions, references)}
    except ValueError as e:
        raise RecipeError(f"task `{spec.name}`: {e}", "metric") from None
    label = args.label or path.stem
    head = {"target": label, "model": label, "adapter": None}
    settings = {"limit": spec.limit, "predictions": str(path)}
    results = [{**head, **r, "settings": settings} for r in generation_records(res)]
    out = Path(args.out)
    print(write_outputs(results, out), flush=True)
    print(f"metrics: {out / 'metrics.json'}")
    return 0


__all__ = ["add_parser", "generation_records", "main", "read_predictions", "score_outputs", "write_outputs"]
