"""Task data a user has: hub dataset ids in task files (fetched once, cached, a clear offline failure) and
`align eval --subjects`. No network here: the hub side is the cache align keeps, filled as a fetch leaves it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from conftest import align

QUESTIONS = {
    "algebra": [("What is 2 + 2?", ["3", "4", "5", "6"], 1), ("What is 3 * 3?", ["6", "9", "12", "3"], 1)],
    "geography": [("Capital of France?", ["Paris", "Rome", "Oslo", "Bern"], 0)],
}


def cais_rows(split: str) -> list[dict]:
    """Rows in the `cais/mmlu` schema, as `datasets` yields them."""
    n = 1 if split == "dev" else None
    return [
        {"question": q, "subject": s, "choices": c, "answer": a} for s, qs in QUESTIONS.items() for q, c, a in qs[:n]
    ]


def mmlu_task(tmp: Path, path: str, fmt: str, **data) -> Path:
    task = {
        "name": "mmlu_tiny",
        "version": 1,
        "type": "mmlu",
        "data": {"path": path, "format": fmt, **data},
        "mmlu": {"num_fewshot": 1},
        "batch_size": 4,
    }
    p = tmp / "mmlu_tiny.yaml"
    p.write_text(yaml.safe_dump(task, sort_keys=False))
    return p


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_hub_task_data_offline_and_not_cached_is_one_clear_message(env, tiny_llama):
    task = mmlu_task(env, "cais/mmlu", "mmlu_jsonl", config="all")
    res = align("eval", str(tiny_llama), "--tasks", str(task), "--out", str(env / "out"))
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "`cais/mmlu` (config all), split test" in res.stderr and "HF_HUB_OFFLINE" in res.stderr
    assert "Traceback" not in res.stderr and not (env / "out" / "metrics.json").exists()


def test_hub_task_data_from_the_cache_runs_offline(env, tiny_llama):
    from align.evaluation.hubdata import cache_file

    for split in ("test", "dev"):
        f = cache_file("cais/mmlu", "all", split, None)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("".join(json.dumps(r) + "\n" for r in cais_rows(split)))
    task = mmlu_task(env, "cais/mmlu", "mmlu_jsonl", config="all")
    res = align("eval", str(tiny_llama), "--tasks", str(task), "--out", str(env / "out"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((env / "out" / "metrics.json").read_text())["results"]
    n = {r["task"]: r["n"] for r in results}
    assert n == {"mmlu_tiny": 3, "mmlu_tiny/algebra": 2, "mmlu_tiny/geography": 1}

    res = align("eval", str(tiny_llama), "--tasks", str(task), "--subjects", "geography", "--out", str(env / "o2"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((env / "o2" / "metrics.json").read_text())["results"]
    assert {r["task"] for r in results} == {"mmlu_tiny", "mmlu_tiny/geography"}


def write_csv_folder(root: Path) -> Path:
    for split in ("test", "dev"):
        (root / split).mkdir(parents=True)
        for subject in QUESTIONS:
            with (root / split / f"{subject}_{split}.csv").open("w", newline="") as fh:
                for q, c, a in QUESTIONS[subject][: 1 if split == "dev" else None]:
                    csv.writer(fh).writerow([q, *c, "ABCD"[a]])
    return root


def test_subjects_pick_from_a_local_task_and_an_unknown_one_is_named(env, tiny_llama):
    data = write_csv_folder(env / "mmlu")
    task = mmlu_task(env, str(data), "mmlu_csv")
    res = align("eval", str(tiny_llama), "--tasks", str(task), "--subjects", "algebra", "--out", str(env / "out"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = json.loads((env / "out" / "metrics.json").read_text())["results"]
    assert {r["task"] for r in results} == {"mmlu_tiny", "mmlu_tiny/algebra"}
    bad = align("eval", str(tiny_llama), "--tasks", str(task), "--subjects", "algebr", "--out", str(env / "bad"))
    assert bad.returncode == 2 and "algebr" in bad.stderr and "algebra" in bad.stderr, bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr
