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

from align.errors import RecipeError, did_you_mean

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


def find_metrics(path: str | Path, field: str = "metrics") -> Path:
    """A metrics.json file, or the one in an eval stage folder (or the last eval stage of a run folder)."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / "metrics.json").is_file():
        return p / "metrics.json"
    if not p.exists():
        raise RecipeError(f"{p} does not exist: give a metrics.json, an eval stage folder or a run folder", field)
    found = sorted(p.glob("*/metrics.json"), key=lambda f: f.stat().st_mtime) if p.is_dir() else []
    found = [f for f in found if _is_metrics(f)]
    if not found:
        raise RecipeError(f"no metrics.json at {p} (nor in an eval stage folder inside it)", field)
    return found[-1]


def _is_metrics(f: Path) -> bool:
    try:
        return json.loads(f.read_bytes().decode("utf-8-sig")).get("schema") == SCHEMA
    except (OSError, ValueError, AttributeError):  # unreadable, not UTF-8, not JSON, not a mapping
        return False


def _read_json(f: Path, field: str) -> Any:
    try:
        raw = f.read_bytes()
    except OSError as e:
        raise RecipeError(f"{f} cannot be read ({e.strerror or e})", field) from None
    if b"\x00" in raw[:8192]:
        raise RecipeError(f"{f} is a binary file, not a metrics.json", field)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{f} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})", field) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecipeError(f"{f} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", field) from None


def load_metrics(path: str | Path, field: str = "metrics") -> dict[str, Any]:
    """A metrics file, checked record by record: RecipeError (exit 2) naming the file and record otherwise."""
    f = find_metrics(path, field)
    data = _read_json(f, field)
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        got = type(data).__name__ if not isinstance(data, dict) else f"schema {data.get('schema')!r}"
        raise RecipeError(f"{f} is not an align metrics file (needs schema {SCHEMA!r} and `results`; got {got})", field)
    problems = check_metrics(data, str(f))
    if problems:
        raise RecipeError([(field, m) for m in problems])
    return data


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type(v: Any) -> str:
    return "null" if v is None else f"{type(v).__name__} {v!r:.40}"


def check_metrics(data: dict[str, Any], where: str) -> list[str]:
    """What makes a metrics mapping unusable for a comparison, each problem naming `where` and the record."""
    results = data.get("results")
    if not isinstance(results, list):
        return [f"{where}: `results` must be a list of records, got {_type(results)}"]
    problems: list[str] = []
    seen: dict[tuple[Any, Any, Any], int] = {}
    for i, r in enumerate(results):
        at = f"{where}: results[{i}]"
        if not isinstance(r, dict):
            problems.append(f"{at} must be a mapping {{task, metric, value, ...}}, got {_type(r)}")
            continue
        bad = False
        for key in ("task", "metric"):
            if key not in r:
                problems.append(f"{at} has no `{key}` (have {sorted(r)})")
                bad = True
            elif not isinstance(r[key], str) or not r[key]:
                problems.append(f"{at}.{key} must be a non-empty string, got {_type(r[key])}")
                bad = True
        if "value" not in r:
            problems.append(f"{at} has no `value` (have {sorted(r)})")
            bad = True
        elif not _number(r["value"]) or not math.isfinite(r["value"]):
            problems.append(f"{at}.value must be a finite number, got {_type(r['value'])}")
            bad = True
        if "target" in r and not isinstance(r["target"], str):
            problems.append(f"{at}.target must be a string, got {_type(r['target'])}")
            bad = True
        version = r.get("task_version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            problems.append(f"{at}.task_version must be a whole number or null, got {_type(version)}")
            bad = True
        n = r.get("n")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
            problems.append(f"{at}.n (items scored) must be a whole number >= 0 or null, got {_type(n)}")
        se = r.get("stderr")
        if se is not None and (not _number(se) or se < 0 or math.isinf(se)):  # NaN: one item, no stderr
            problems.append(f"{at}.stderr must be a number >= 0 or null, got {_type(se)}")
        hib = r.get("higher_is_better", True)
        if not isinstance(hib, bool):
            problems.append(f"{at}.higher_is_better must be true or false, got {_type(hib)}")
        if bad:
            continue
        key3 = (r.get("target", ""), r["task"], r["metric"])
        if key3 in seen:
            name = "/".join(x for x in key3 if x)
            problems.append(f"{at} repeats `{name}` of results[{seen[key3]}]: each target/task/metric once")
        else:
            seen[key3] = i
    tol = data.get("tolerances", {})
    if not isinstance(tol, dict):
        problems.append(f"{where}: `tolerances` must be a mapping METRIC: SPEC, got {_type(tol)}")
    else:
        for k, v in tol.items():
            try:
                parse_tolerance(v)
            except RecipeError as e:
                problems.append(f"{where}: tolerances.{k}: {e.problems[0][1]}")
    return problems


def parse_tolerance(spec: str | float) -> tuple[str, float]:
    s = str(spec).strip()
    try:
        if isinstance(spec, bool):
            raise ValueError
        if s.endswith("%"):
            kind, amount = "relative", float(s[:-1]) / 100
        elif s.endswith("se"):
            kind, amount = "stderr", float(s[:-2])
        else:
            kind, amount = "absolute", float(s)
    except ValueError:
        raise RecipeError(f"tolerance `{spec}` is not a number, `N%` or `Nse`", "tolerance") from None
    if not math.isfinite(amount) or amount < 0:
        raise RecipeError(f"tolerance `{spec}` must be a finite number >= 0", "tolerance")
    return kind, amount


def _index(results: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(r.get("target", ""), r["task"], r["metric"]): r for r in results}


def compare(current: dict[str, Any], baseline: dict[str, Any], tolerances: dict[str, str] | None = None) -> list[Row]:
    """Compare two metrics files; raises RecipeError (exit 2) when they cannot be compared."""
    problems: list[tuple[str, str]] = [("", m) for m in check_metrics(current, "current metrics")]
    problems += [("", m) for m in check_metrics(baseline, "baseline")]
    if not problems and not baseline["results"]:
        problems.append(("", "the baseline has no results: there is nothing to compare against"))
    if problems:
        raise RecipeError(problems)
    tol = {**baseline.get("tolerances", {}), **(tolerances or {})}
    names = {r["metric"] for r in baseline["results"]} | {f"{r['task']}/{r['metric']}" for r in baseline["results"]}
    for k, v in (tolerances or {}).items():
        parse_tolerance(v)  # a bad one is named even when no metric uses it
        if k not in names:
            raise RecipeError(
                f"`{k}` names no metric of the baseline (it has {', '.join(sorted(names))}){did_you_mean(k, names)}",
                "--tolerance",
            )
    cur, base = _index(current["results"]), _index(baseline["results"])
    if len({k[0] for k in cur}) == 1 and len({k[0] for k in base}) == 1:
        cur = {("", t, m): r for (_, t, m), r in cur.items()}
        base = {("", t, m): r for (_, t, m), r in base.items()}
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
            se = math.hypot(_stderr(b) or 0.0, _stderr(c) or 0.0)
            allowed = amount * se
        else:
            allowed = amount
        delta = c["value"] - b["value"]
        worse = -delta if hib else delta
        rows.append(Row(name, b["value"], c["value"], delta, allowed, hib, worse > allowed + 1e-12))
    if problems:
        raise RecipeError(problems)
    return rows


def _stderr(r: dict[str, Any]) -> float | None:
    """A record's standard error; None when absent or NaN (a single item has none), so it never widens a tolerance
    to NaN (which no difference would exceed: a silent pass)."""
    se = r.get("stderr")
    return float(se) if _number(se) and math.isfinite(se) else None


def _default(b: dict[str, Any], c: dict[str, Any]) -> str:
    return "2se" if _stderr(b) and _stderr(c) else "1%"


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
