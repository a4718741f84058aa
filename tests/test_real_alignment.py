"""Slow: the quick RLHF and DPO recipes on the real default model, judged on real HH-RLHF pairs that are not
in the repo (minutes each).

The recipes train on the pairs shipped in recipes/data; the held-out pairs are the short pairs of
../shared/data/pref that no shipped file holds. Run with `pytest -m slow tests/test_real_alignment.py -s`
(`-s` prints the figures)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import ROOT, align, write_jsonl

SHARED = ROOT.parent / "shared" / "data" / "pref" / "hh_rlhf_harmless_500.jsonl"
SHIPPED = ("hh_rlhf_harmless_160.jsonl", "hh_rlhf_harmless_rm_319.jsonl")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SHARED.is_file(), reason="needs ../shared/data/pref/hh_rlhf_harmless_500.jsonl"),
]


def unseen_pairs(tmp: Path) -> tuple[Path, int]:
    """The short pairs (prompt + reply under 700 characters) that no shipped recipe file holds."""
    shipped = {json.loads(x)["prompt"] for f in SHIPPED for x in (ROOT / "recipes/data" / f).open()}
    rows = [json.loads(x) for x in SHARED.open()]
    rows = [
        {k: r[k] for k in ("prompt", "chosen", "rejected")}
        for r in rows
        if r["prompt"] not in shipped and len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])) < 700
    ]
    assert len(rows) >= 100
    return write_jsonl(tmp / "unseen.jsonl", rows), len(rows)


def metrics(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "stage.json").read_text())["metrics"]


def held_out_on(path: Path) -> list[str]:
    return ["datasets.pairs.eval_fraction=null", f"datasets.pairs.eval_path={path}"]


def test_dpo_quick_on_unseen_pairs(tmp_path) -> None:
    data, n = unseen_pairs(tmp_path)
    res = align("run", "recipes/dpo_quick.yaml", f"output_dir={tmp_path}", *held_out_on(data), cwd=ROOT, timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    m = metrics(tmp_path / "dpo-quick", "dpo")
    print(f"\nDPO on {n} unseen pairs:", {k: v for k, v in m.items() if k.startswith("eval_")})
    assert m["eval_pairs"] == n
    assert m["eval_reward_accuracies"] > m["eval_reward_accuracies_before"]
    assert m["eval_reward_margins"] > m["eval_reward_margins_before"]
    assert m["eval_loss"] < m["eval_loss_before"]


def test_rlhf_quick_on_unseen_pairs(tmp_path) -> None:
    data, n = unseen_pairs(tmp_path)
    res = align("run", "recipes/rlhf_quick.yaml", f"output_dir={tmp_path}", *held_out_on(data), cwd=ROOT, timeout=5400)
    assert res.returncode == 0, res.stderr[-3000:]
    rm = metrics(tmp_path / "rlhf-quick", "reward")
    ppo = metrics(tmp_path / "rlhf-quick", "ppo")
    print(f"\nreward model on {n} unseen pairs:", {k: v for k, v in rm.items() if k.startswith("eval_")})
    print("ppo:", ppo)
    assert rm["eval_pairs"] == n
    # clearly above chance: more than two binomial standard errors above 0.5
    assert rm["eval_accuracy"] > 0.5 + 2 * math.sqrt(0.25 / n) and rm["eval_margin"] > 0
    assert ppo["reward_last"] > ppo["reward_first"]
    assert 0 <= ppo["kl_last"] < 20  # bounded by the KL penalty
