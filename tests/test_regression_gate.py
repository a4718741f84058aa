"""The CI gate, on the project's own regression recipe: the same model passes, a degraded one fails the build.

The default suite runs `recipes/regression.yaml` with its model swapped for a tiny local one (fast); the slow
test runs it as CI does, on the real default model, against the committed baseline."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import ROOT, align

FAST = ["stages.sft.train.max_steps=8", "stages.sft.train.max_length=64", "stages.sft.train.learning_rate=5e-3"]


def test_gate_passes_the_same_model_and_fails_a_degraded_one(tmp_path, tiny_llama) -> None:
    recipe = str(ROOT / "recipes" / "regression.yaml")
    good = align("run", recipe, f"model={tiny_llama}", f"output_dir={tmp_path / 'good'}", *FAST)
    assert good.returncode == 0, good.stderr[-3000:]
    baseline = tmp_path / "baseline.json"
    data = json.loads((tmp_path / "good" / "regression" / "heldout-ppl" / "metrics.json").read_text())
    baseline.write_text(json.dumps({**data, "tolerances": {"perplexity": "2%"}}))

    # the same recipe and model again, from scratch: passes
    shutil.rmtree(tmp_path / "good")
    again = align("run", recipe, f"model={tiny_llama}", f"output_dir={tmp_path / 'good'}", *FAST)
    assert again.returncode == 0
    ok = align("compare", str(tmp_path / "good" / "regression" / "heldout-ppl"), "--baseline", str(baseline))
    assert ok.returncode == 0, ok.stdout + ok.stderr

    # deliberately degraded: the adapter barely trains, so held-out perplexity of `sft` is far worse
    bad = align(
        "run",
        recipe,
        f"model={tiny_llama}",
        f"output_dir={tmp_path / 'bad'}",
        *FAST,
        "stages.sft.train.learning_rate=1e-9",
    )
    assert bad.returncode == 0
    gate = align("compare", str(tmp_path / "bad" / "regression" / "heldout-ppl"), "--baseline", str(baseline))
    assert gate.returncode == 1, gate.stdout + gate.stderr
    assert "sft" in gate.stdout and "regress" in gate.stdout.lower()
    # a baseline of other tasks is unusable input: exit 2, not a silent pass
    other = {**data, "results": [{**r, "task": "other"} for r in data["results"]]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    unusable = align(
        "compare", str(tmp_path / "bad" / "regression" / "heldout-ppl"), "--baseline", str(tmp_path / "other.json")
    )
    assert unusable.returncode == 2


@pytest.mark.slow
def test_regression_recipe_passes_the_committed_baseline(tmp_path) -> None:
    """What CI's regression job does, on the real default model (about 6 minutes)."""
    res = align("run", "recipes/regression.yaml", f"output_dir={tmp_path}", cwd=ROOT, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    gate = align(
        "compare",
        str(tmp_path / "regression" / "heldout-ppl"),
        "--baseline",
        "evaluation/baselines/regression.json",
        cwd=ROOT,
    )
    assert gate.returncode == 0, gate.stdout + gate.stderr
