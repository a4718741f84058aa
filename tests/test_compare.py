"""The regression gate against hand-worked numbers, and its exit codes."""

from __future__ import annotations

import json

import pytest

from align.cli import main
from align.errors import RecipeError
from align.evaluation.compare import SCHEMA, compare, parse_tolerance


def metrics(*recs):
    return {
        "schema": SCHEMA,
        "results": [
            dict(
                zip(("task", "metric", "value", "stderr", "higher_is_better"), r, strict=True),
                target="sft",
                task_version=1,
            )
            for r in recs
        ],
    }


def test_parse_tolerance():
    assert parse_tolerance("0.5") == ("absolute", 0.5)
    assert parse_tolerance("2%") == ("relative", 0.02)
    assert parse_tolerance("1.5se") == ("stderr", 1.5)
    with pytest.raises(RecipeError):
        parse_tolerance("lots")


def test_direction_and_tolerances():
    base = metrics(("mmlu", "acc", 0.50, 0.03, True), ("held", "perplexity", 10.0, None, False))
    # accuracy down 0.05; pooled se = sqrt(0.03^2 + 0.04^2) = 0.05 -> 2se allows 0.10: passes
    # perplexity up 0.2 on 10.0; default 1% allows 0.1: regresses
    cur = metrics(("mmlu", "acc", 0.45, 0.04, True), ("held", "perplexity", 10.2, None, False))
    rows = {r.key: r for r in compare(cur, base)}
    assert rows["mmlu/acc"].allowed == pytest.approx(0.10) and not rows["mmlu/acc"].regressed
    assert rows["held/perplexity"].allowed == pytest.approx(0.1) and rows["held/perplexity"].regressed
    # a lower perplexity is an improvement, never a regression
    assert not compare(
        metrics(("held", "perplexity", 5.0, None, False)), metrics(("held", "perplexity", 10.0, None, False))
    )[0].regressed
    # explicit tolerances: by metric, or by task/metric
    assert not compare(cur, base, {"perplexity": "3%"})[1].regressed
    assert compare(cur, base, {"mmlu/acc": "0.01"})[0].regressed


def test_unusable_input(tmp_path):
    base = metrics(("mmlu", "acc", 0.5, 0.03, True))
    with pytest.raises(RecipeError, match="missing from the current"):
        compare(metrics(("other", "acc", 0.5, 0.03, True)), base)
    cur = metrics(("mmlu", "acc", 0.5, 0.03, True))
    cur["results"][0]["task_version"] = 2
    with pytest.raises(RecipeError, match="task version 2 != baseline 1"):
        compare(cur, base)


def test_cli_exit_codes(tmp_path, capsys):
    b, good, bad = tmp_path / "b.json", tmp_path / "good.json", tmp_path / "bad.json"
    b.write_text(json.dumps(metrics(("mmlu", "acc", 0.5, 0.03, True))))
    good.write_text(json.dumps(metrics(("mmlu", "acc", 0.49, 0.03, True))))
    bad.write_text(json.dumps(metrics(("mmlu", "acc", 0.30, 0.03, True))))
    assert main(["compare", str(good), "--baseline", str(b)]) == 0
    assert "1 passed, 0 regressed" in capsys.readouterr().out
    assert main(["compare", str(bad), "--baseline", str(b)]) == 1
    assert "REGRESSED" in capsys.readouterr().out
    (tmp_path / "junk.json").write_text("{}")
    assert main(["compare", str(tmp_path / "junk.json"), "--baseline", str(b)]) == 2
    assert main(["compare", str(tmp_path / "none"), "--baseline", str(b)]) == 2


def test_comparison_plot_is_a_png_with_one_panel_per_metric(tmp_path) -> None:
    from align.evaluation.plot import plot_results

    rows = [
        {"target": t, "task": task, "metric": m, "value": v, "stderr": se, "higher_is_better": hib}
        for t, task, m, v, se, hib in [
            ("base", "mmlu", "acc", 0.30, 0.02, True),
            ("sft", "mmlu", "acc", 0.35, 0.02, True),
            ("base", "held", "perplexity", 12.0, None, False),
            ("sft", "held", "perplexity", 9.0, None, False),
        ]
    ]
    out = plot_results(rows, tmp_path / "c.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width = int.from_bytes(data[16:20], "big")
    assert width > 700  # two panels side by side
    assert plot_results([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
