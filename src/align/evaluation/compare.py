"""Regression gate: compare a current metrics.json with a baseline, direction-aware, per-metric tolerance.

A metrics file (schema `align.metrics/1`) holds `results`, a list of records
`{target, task, task_version, metric, value, stderr, n, higher_is_better}`. Records are matched on
(target, task, metric); when each side holds one target only, targets are matched whatever their names.

Tolerance per metric, from `--tolerance METRIC=SPEC` or the baseline file's `tolerances` mapping:
`0.5` absolute, `2%` relative to the baseline value, `2se` in units of the pooled standard error
(sqrt(se_base^2 + se_current^2)). Default: `2se` where both sides have a stderr, else `1%`.
A metric regresses when it is worse than the baseline by more than its tolerance, in its own direction.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.errors import RecipeError

SCHEMA = "align.metrics/1"


@dataclass
class Row:
    key: str
    baseline: float
    current: float
    delta: float
    allowed: float
    higher_is_better: bool
    regressed: bool


def find_metrics(path: str | Path) -> Path:
    """A metrics.json file, or the one in an eval stage folder (or the last eval stage of a run folder)."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / "metrics.json").is_file():
        return p / "metrics.json"
    found = sorted(p.glob("*/metrics.json"), key=lambda f: f.stat().st_mtime) if p.is_dir() else []
    found = [f for f in found if _is_metrics(f)]
    if not found:
        raise RecipeError(f"no metrics.json at {p}", "metrics")
    return found[-1]


def _is_metrics(f: Path) -> bool:
    try:
        return json.loads(f.read_text()).get("schema") == SCHEMA
    except (json.JSONDecodeError, AttributeError):
        return False


def load_metrics(path: str | Path) -> dict[str, Any]:
    f = find_metrics(path)
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise RecipeError(f"{f} is not valid JSON: {e}", "metrics") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("results"), list):
        raise RecipeError(f"{f} is not an align metrics file (schema {SCHEMA!r} with `results`)", "metrics")
    return data


def parse_tolerance(spec: str | float) -> tuple[str, float]:
    s = str(spec).strip()
    try:
        if s.endswith("%"):
            return "relative", float(s[:-1]) / 100
        if s.endswith("se"):
            return "stderr", float(s[:-2])
        return "absolute", float(s)
    except ValueError:
        raise RecipeError(f"tolerance `{spec}` is not a number, `N%` or `Nse`", "tolerance") from None


def _index(results: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(r.get("target", ""), r["task"], r["metric"]): r for r in results}


def compare(current: dict[str, Any], baseline: dict[str, Any], tolerances: dict[str, str] | None = None) -> list[Row]:
    """Compare two metrics files; raises RecipeError (exit 2) when they cannot be compared."""
    tol = {**baseline.get("tolerances", {}), **(tolerances or {})}
    cur, base = _index(current["results"]), _index(baseline["results"])
    if len({k[0] for k in cur}) == 1 and len({k[0] for k in base}) == 1:
        cur = {("", t, m): r for (_, t, m), r in cur.items()}
        base = {("", t, m): r for (_, t, m), r in base.items()}
    problems = []
    rows = []
    for key, b in base.items():
        name = "/".join(x for x in key if x)
        c = cur.get(key)
        if c is None:
            problems.append((name, "in the baseline but missing from the current metrics"))
            continue
        if c.get("task_version") != b.get("task_version"):
            problems.append((name, f"task version {c.get('task_version')} != baseline {b.get('task_version')}"))
            continue
        hib = bool(b.get("higher_is_better", True))
        kind, amount = parse_tolerance(tol.get(f"{b['task']}/{b['metric']}", tol.get(b["metric"], _default(b, c))))
        if kind == "relative":
            allowed = abs(b["value"]) * amount
        elif kind == "stderr":
            se = math.hypot(b.get("stderr") or 0.0, c.get("stderr") or 0.0)
            allowed = amount * se
        else:
            allowed = amount
        delta = c["value"] - b["value"]
        worse = -delta if hib else delta
        rows.append(Row(name, b["value"], c["value"], delta, allowed, hib, worse > allowed + 1e-12))
    if problems:
        raise RecipeError(problems)
    return rows


def _default(b: dict[str, Any], c: dict[str, Any]) -> str:
    return "2se" if b.get("stderr") and c.get("stderr") else "1%"


def render(rows: list[Row]) -> str:
    lines = ["| metric | baseline | current | change | allowed | result |", "|---|---|---|---|---|---|"]
    for r in rows:
        arrow = "higher better" if r.higher_is_better else "lower better"
        verdict = "REGRESSED" if r.regressed else "ok"
        lines.append(
            f"| {r.key} ({arrow}) | {r.baseline:.4g} | {r.current:.4g} | {r.delta:+.4g} | {r.allowed:.3g} | {verdict} |"
        )
    bad = sum(r.regressed for r in rows)
    lines.append("")
    lines.append(f"{len(rows) - bad} passed, {bad} regressed" if rows else "nothing to compare")
    return "\n".join(lines)
