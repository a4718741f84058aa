"""Slow: the quick RLHF and DPO recipes on the real default model and real HH-RLHF pairs (minutes each).

Pairs not shipped in recipes/data come from ../shared/data/pref (the shipped file holds the first 160
short pairs); run with `pytest -m slow tests/test_real_alignment.py`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, align, write_jsonl

SHARED = ROOT.parent / "shared" / "data" / "pref" / "hh_rlhf_harmless_500.jsonl"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED.is_file(), reason="needs ../shared/data/pref/hh_rlhf_harmless_500.jsonl"),
]


def unseen_pairs(tmp: Path) -> Path:
    """Short pairs that are not in the shipped recipe data."""
    shipped = {json.loads(x)["prompt"] for x in (ROOT / "recipes/data/hh_rlhf_harmless_160.jsonl").open()}
    rows = [json.loads(x) for x in SHARED.open()]
    rows = [
        {k: r[k] for k in ("prompt", "chosen", "rejected")}
        for r in rows
        if r["prompt"] not in shipped and len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])) < 700
    ]
    return write_jsonl(tmp / "unseen.jsonl", rows[:120])


def metrics(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "stage.json").read_text())["metrics"]


def test_dpo_quick_on_unseen_pairs(tmp_path) -> None:
    data = unseen_pairs(tmp_path)
    res = align(
        "run", "recipes/dpo_quick.yaml", f"output_dir={tmp_path}", f"datasets.pairs.path={data}", cwd=ROOT, timeout=3600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    m = metrics(tmp_path / "dpo-quick", "dpo")
    assert m["eval_reward_accuracies"] > m["eval_reward_accuracies_before"]
    assert m["eval_reward_margins"] > m["eval_reward_margins_before"]


def test_rlhf_quick_on_unseen_pairs(tmp_path) -> None:
    data = unseen_pairs(tmp_path)
    res = align(
        "run",
        "recipes/rlhf_quick.yaml",
        f"output_dir={tmp_path}",
        f"datasets.pairs.path={data}",
        cwd=ROOT,
        timeout=3600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rm = metrics(tmp_path / "rlhf-quick", "reward")
    assert rm["eval_accuracy"] > 0.55 and rm["eval_margin"] > 0  # above chance on held-out pairs
    ppo = metrics(tmp_path / "rlhf-quick", "ppo")
    assert ppo["reward_last"] > ppo["reward_first"]
    assert 0 <= ppo["kl_last"] < 20  # bounded by the KL penalty
