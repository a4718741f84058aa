"""runs/<run>/report.md: what a run trained, how training went and what evaluation measured.

Every figure is read from the run folder - run.json, and each stage's stage.json, config.yaml, inputs.json,
versions.json, metrics.json and train_log.jsonl - and nothing is recomputed or estimated, so the report can be
trusted as far as the run's own records can. Without run.json (runs made before it existed) the stages are the
folders holding a stage.json, in the order they finished. The pieces (`stage_chain`, `results_table`,
`datasets_table`, `versions_table`, `recipe_yaml`, `plots`) are public because a model card (`align.card`) is
built from the same ones. Paths are shown relative to the run, or as `<local>/name` where a record holds an
absolute one, so a report (and a card) never names a folder of the machine that made it.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from align.stages.online import TRL_REWARD_KEY

REPORT_DIR = "report"  # the plots, beside report.md
# bookkeeping in a stage's metrics: shown in the stage's own columns or its details, not among the headline
NOT_HEADLINE = {
    "steps",
    "train_runtime_s",
    "seconds",
    "trainable_params",
    "world_size",
    "distributed_type",
    "weights_sha256",
    "trainable_dtype",
    "dtype",
    "resumed_from",
    "peak_memory_bytes",
    "trainable_tensors_changed",
    "tokens_seen",
    "prompts",
    "prompts_skipped_too_long",
    "heldout",
    "eval_pairs",
}
# held-out accuracy before and after training, as the reward and DPO-family stages name them in metrics.json
HELDOUT_ACCURACY = (
    ("eval_accuracy_before", "eval_accuracy"),
    ("eval_reward_accuracies_before", "eval_reward_accuracies"),
)
HELDOUT_MARGIN = (("eval_margin_before", "eval_margin"), ("eval_reward_margins_before", "eval_reward_margins"))
# what the trainers log, by the names they log it under (TRL's trainers, align's PPO)
LOGGED_ACCURACY = ("accuracy", "rewards/accuracies")
LOGGED_EVAL_ACCURACY = ("eval_accuracy", "eval_rewards/accuracies")
LOGGED_REWARD = ("reward_mean", TRL_REWARD_KEY)  # align's PPO, TRL's GRPO/RLOO
SECRET_KEYS = {"token", "hf_token", "hub_token", "api_key", "password", "secret"}
TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{30,}")  # a hub access token
ABS_PATH_RE = re.compile(r"(?<![\w.:/~>-])(?:~|[A-Za-z]:)?/(?:[\w.+-]+/)*[\w.+-]+")


# ---------------------------------------------------------------- reading the run


@dataclass
class Stage:
    """One stage of the run as its folder records it (`info` is None while the stage is not done)."""

    name: str
    type: str
    folder: Path
    info: dict[str, Any] | None
    config: dict[str, Any]
    inputs: dict[str, Any]
    metrics: dict[str, Any]
    versions: dict[str, Any]
    log: list[dict[str, Any]]

    @property
    def done(self) -> bool:
        return self.info is not None

    @property
    def headline(self) -> dict[str, Any]:
        return (self.info or {}).get("metrics") or {}

    @property
    def spec(self) -> dict[str, Any]:
        """The stage as the recipe resolved it (config.yaml's `stage`)."""
        return self.config.get("stage") or {}

    @property
    def sources(self) -> list[str]:
        """The earlier stages this stage read (inputs.json names each with its output hash)."""
        return [k for k, v in self.inputs.items() if k not in ("model", "data") and isinstance(v, dict)]

    @property
    def results(self) -> list[dict[str, Any]]:
        return list(self.metrics.get("results") or []) if is_eval(self) else []


def traits(s: Stage) -> dict[str, Any]:
    """What the stage type is, as stage.json records it (`traits`); older runs: read from the output."""
    return (s.info or {}).get("traits") or {}


def is_eval(s: Stage) -> bool:
    t = traits(s)
    if "evaluates" in t:
        return bool(t["evaluates"])
    return (s.info or {}).get("output", {}).get("kind") == "metrics" or "tasks" in s.spec


def is_online_rl(s: Stage) -> bool:
    t = traits(s)
    return bool(t.get("online_rl")) if "online_rl" in t else "reward_first" in s.headline


def is_trl(s: Stage) -> bool:
    return bool(traits(s).get("trainer"))


@dataclass
class Run:
    folder: Path
    record: dict[str, Any] | None  # run.json, when the orchestrator wrote one
    stages: list[Stage]
    base: dict[str, Any]  # {"ref", "kind", "hub_id"}

    @property
    def name(self) -> str:
        return self.folder.name

    def get(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage `{name}` in run {self.name} (stages: {', '.join(s.name for s in self.stages)})")

    def lineage(self, name: str) -> list[Stage]:
        """The stage and every stage it was built from (policy, reward model, ...), in run order."""
        seen: set[str] = set()
        todo = [name]
        while todo:
            n = todo.pop()
            if n in seen or n not in {s.name for s in self.stages}:
                continue
            seen.add(n)
            todo.extend(self.get(n).sources)
        return [s for s in self.stages if s.name in seen]

    @property
    def evals(self) -> list[Stage]:
        return [s for s in self.stages if is_eval(s) and s.done]


def _json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return default


def _yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _log(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _stage(folder: Path, name: str, type_: str | None) -> Stage:
    info = _json(folder / "stage.json", None)
    config = _yaml(folder / "config.yaml")
    type_ = type_ or (info or {}).get("type") or (config.get("stage") or {}).get("type") or "?"
    return Stage(
        name,
        type_,
        folder,
        info if isinstance(info, dict) else None,
        config,
        _json(folder / "inputs.json", {}),
        _json(folder / "metrics.json", {}),
        _json(folder / "versions.json", {}),
        _log(folder / "train_log.jsonl"),
    )


def read_run(run_dir: Path | Run) -> Run:
    """The run as its folder records it: run.json's stage order, else the finished stages by finish time.
    (Every piece below takes a run folder or a `Run` already read, so a whole report reads the files once.)"""
    if isinstance(run_dir, Run):
        return run_dir
    run_dir = Path(run_dir)
    record = _json(run_dir / "run.json", None)
    if isinstance(record, dict) and record.get("stages"):
        stages = [_stage(run_dir / s["name"], s["name"], s.get("type")) for s in record["stages"]]
    else:
        record = None
        found = [
            _stage(d, d.name, None) for d in sorted(run_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")
        ]
        done = [s for s in found if s.done]
        # finish times have one-second resolution; stage.json's mtime breaks a tie
        stages = sorted(
            done, key=lambda s: (str((s.info or {}).get("finished", "")), (s.folder / "stage.json").stat().st_mtime)
        )
    base = (record or {}).get("base_model") or _base_from_stages(stages)
    return Run(run_dir, record, stages, base)


def _base_from_stages(stages: list[Stage]) -> dict[str, Any]:
    """The base model as the stages recorded it (stage.json's output chain, else inputs.json's model)."""
    from align.models import ResolvedModel, hub_id

    for s in stages:
        rec = (s.info or {}).get("output", {}).get("base")
        while isinstance(rec, dict) and rec.get("kind") != "base_model":
            rec = rec.get("base")
        if isinstance(rec, dict):
            kind, ref = rec.get("source", "local"), rec.get("ref", "")
            return {"ref": ref, "kind": kind, "hub_id": hub_id(ResolvedModel(kind, ref, None))}
    for s in stages:
        m = s.inputs.get("model")
        if isinstance(m, dict) and m.get("ref"):
            kind = m.get("kind", "local")
            return {"ref": m["ref"], "kind": kind, "hub_id": hub_id(ResolvedModel(kind, m["ref"], None))}
    return {"ref": "?", "kind": "?", "hub_id": None}


# ---------------------------------------------------------------- formatting


def fmt(v: Any) -> str:
    """A number as the report prints it: 4 decimals from 1 up, 4 significant digits below 1 (parses back close)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == 0:
            return "0"
        return f"{v:.4f}" if abs(v) >= 1 else f"{v:.4g}"
    return public(str(v))


def public(text: str) -> str:
    """Text safe to publish: an absolute local path becomes `<local>/<its last part>`, a token `<redacted>`."""
    text = TOKEN_RE.sub("<redacted>", text)
    return ABS_PATH_RE.sub(lambda m: f"<local>/{m.group(0).rstrip('/').rsplit('/', 1)[-1]}", text)


def public_data(obj: Any) -> Any:
    """`public` over a nested record; a secret-named key's value is dropped outright."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if str(k).lower() in SECRET_KEYS and v else public_data(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [public_data(v) for v in obj]
    return public(obj) if isinstance(obj, str) else obj


def base_label(base: dict[str, Any]) -> str:
    """The base model as a reader knows it: its hub id, the embedded name, or a local folder's name."""
    ref, kind, hub = str(base.get("ref", "?")), base.get("kind"), base.get("hub_id")
    if kind == "embedded":
        return f"`{ref}` (embedded; {hub})" if hub else f"`{ref}` (embedded)"
    if kind == "hub":
        return f"`{ref}`"
    return f"local folder `{Path(ref).name}`"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _adapter(stage: Stage) -> str:
    a = stage.spec.get("adapter")
    if not isinstance(a, dict):
        return "-"
    return f"{a.get('type')} r={a.get('r')}" if a.get("type") not in ("full", None) else str(a.get("type"))


def _runtime(stage: Stage) -> Any:
    m = stage.headline
    return m.get("train_runtime_s", m.get("seconds"))


def _input(stage: Stage) -> str:
    if is_eval(stage):
        targets = stage.config.get("targets") or stage.spec.get("targets") or []
        return "targets: " + ", ".join(public(str(t)) for t in targets) if targets else "-"
    return ", ".join(stage.sources) or "base"


def _headline(stage: Stage) -> str:
    if not stage.done:
        return "not done"
    if is_eval(stage):
        return f"{len(stage.results)} results (see Evaluation)"
    m = stage.headline
    shown = {
        k: v for k, v in m.items() if k not in NOT_HEADLINE and isinstance(v, int | float) and not isinstance(v, bool)
    }
    return ", ".join(f"{k} {fmt(v)}" for k, v in shown.items())


# ---------------------------------------------------------------- the pieces


def stage_chain(run_dir: Path | Run, stage: str | None = None) -> str:
    """Markdown table of the stages (all, or those `stage` was built from): type, input, adapter, steps,
    runtime, world size, trainable parameters and the stage's headline metrics, all from stage.json."""
    run = read_run(run_dir)
    stages = run.lineage(stage) if stage else run.stages
    rows = []
    for s in stages:
        m = s.headline
        rows.append(
            [
                f"`{s.name}`",
                s.type,
                _input(s),
                _adapter(s),
                fmt(m.get("steps")),
                fmt(_runtime(s)),
                fmt(m.get("world_size", s.metrics.get("processes") if is_eval(s) else None)),
                fmt(m.get("trainable_params")),
                _headline(s),
            ]
        )
    header = ["stage", "type", "input", "adapter", "steps", "runtime (s)", "world size", "trainable params"]
    return _table([*header, "headline metrics"], rows)


def _result_key(r: dict[str, Any]) -> tuple[str, str]:
    return str(r.get("task")), str(r.get("metric"))


def eval_results(run_dir: Path | Run) -> list[tuple[str, dict[str, Any]]]:
    """Every result of every finished eval stage, as (eval stage name, metrics.json result), in run order."""
    return [(s.name, r) for s in read_run(run_dir).evals for r in s.results]


def results_table(run_dir: Path | Run, *, focus: str | None = None) -> str:
    """Markdown: one row per task/metric, one column per target (base, then the stages in run order), and the
    change of `focus` (default: the last target) from base. Values are metrics.json's, `± stderr` where known."""
    run = read_run(run_dir)
    results = eval_results(run_dir)
    if not results:
        return "No evaluation results in this run.\n"
    order = {"base": -1, **{s.name: i for i, s in enumerate(run.stages)}}
    seen = list(dict.fromkeys(str(r["target"]) for _, r in results))
    targets = sorted(seen, key=lambda t: (order.get(t, len(order)), seen.index(t)))
    focus = focus if focus in targets else targets[-1]
    several = len({e for e, _ in results}) > 1
    rows_by: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for ev, r in results:
        rows_by.setdefault((ev if several else "", *_result_key(r)), {})[str(r["target"])] = r
    rows = []
    for (ev, task, metric), by_target in rows_by.items():
        first = next(iter(by_target.values()))
        better = "↑" if first.get("higher_is_better", True) else "↓"
        label = f"{ev}: {task} / {metric} {better}" if ev else f"{task} / {metric} {better}"
        cells = []
        for t in targets:
            r = by_target.get(t)
            if r is None:
                cells.append("-")
            else:
                cells.append(fmt(r["value"]) + (f" ± {fmt(r['stderr'])}" if r.get("stderr") is not None else ""))
        rows.append([label, fmt(first.get("n")), *cells, _change(by_target.get("base"), by_target.get(focus))])
    header = ["task / metric", "n", *[f"`{t}`" for t in targets], f"change ({focus} vs base)"]
    return _table(header, rows)


def _change(base: dict[str, Any] | None, new: dict[str, Any] | None) -> str:
    if base is None or new is None or new is base:
        return "-"
    a, b = base.get("value"), new.get("value")
    if not isinstance(a, int | float) or not isinstance(b, int | float):
        return "-"
    d = b - a
    rel = f" ({d / abs(a):+.1%})" if a else ""
    if d == 0:
        return "0"
    good = (d > 0) == bool(new.get("higher_is_better", True))
    return f"{'+' if d > 0 else ''}{fmt(d)}{rel}, {'better' if good else 'worse'}"


def training_table(run_dir: Path | Run, stage: str | None = None) -> str:
    """Losses and held-out figures the training stages recorded (first/last logged loss, held-out before/after)."""
    run = read_run(run_dir)
    stages = [s for s in (run.lineage(stage) if stage else run.stages) if not is_eval(s) and s.done]
    keys = [
        ("first_loss", "first loss"),
        ("last_loss", "last loss"),
        ("eval_loss_before", "held-out loss before"),
        ("eval_loss", "held-out loss after"),
    ]
    rows = [[f"`{s.name}`", s.type, *[fmt(s.headline.get(k)) for k, _ in keys]] for s in stages]
    rows = [r for r in rows if set(r[2:]) != {"-"}]  # PPO logs no single loss
    return _table(["stage", "type", *[h for _, h in keys]], rows) if rows else ""


def preference_table(run_dir: Path | Run, stage: str | None = None) -> str:
    """Held-out pairwise accuracy and margin before and after, for the reward and DPO-family stages."""
    run = read_run(run_dir)
    rows = []
    for s in run.lineage(stage) if stage else run.stages:
        m = s.headline
        acc = next(((b, a) for b, a in HELDOUT_ACCURACY if a in m), None)
        if not acc:
            continue
        mar = next(((b, a) for b, a in HELDOUT_MARGIN if a in m), (None, None))
        rows.append(
            [
                f"`{s.name}`",
                s.type,
                fmt(m.get("eval_pairs")),
                fmt(m.get(acc[0])),
                fmt(m.get(acc[1])),
                fmt(m.get(mar[0])) if mar[0] else "-",
                fmt(m.get(mar[1])) if mar[1] else "-",
            ]
        )
    header = ["stage", "type", "held-out pairs", "accuracy before", "accuracy after", "margin before", "margin after"]
    return _table(header, rows) if rows else ""


def rl_table(run_dir: Path | Run, stage: str | None = None) -> str:
    """First and last logged reward and KL of the PPO / GRPO / RLOO stages."""
    run = read_run(run_dir)
    keys = ["reward_first", "reward_last", "kl_first", "kl_last"]
    rows = [
        [f"`{s.name}`", s.type, *[fmt(s.headline.get(k)) for k in keys]]
        for s in (run.lineage(stage) if stage else run.stages)
        if is_online_rl(s) and s.done
    ]
    return _table(["stage", "type", "reward first", "reward last", "KL first", "KL last"], rows) if rows else ""


def _dataset_rows(stage: Stage) -> list[tuple[str, dict[str, Any]]]:
    data = stage.inputs.get("data")
    return [(n, d) for n, d in data.items() if isinstance(d, dict)] if isinstance(data, dict) else []


def hub_datasets(stages: list[Stage]) -> list[str]:
    """The hub ids of the datasets these stages read (a local dataset records file hashes, not a path)."""
    ids = []
    for s in stages:
        for _, d in _dataset_rows(s):
            path = (d.get("spec") or {}).get("path")
            if isinstance(path, str) and looks_like_hub_id(path):
                ids.append(path)
    return list(dict.fromkeys(ids))


def looks_like_hub_id(text: str) -> bool:
    """`owner/name` and nothing that reads as a local path."""
    if text.startswith((".", "/", "~")) or ".." in text or "\\" in text:
        return False
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*", text) is not None


def datasets_table(run_dir: Path | Run, stages: list[str] | None = None) -> str:
    """The datasets the stages read, as inputs.json identifies them: hub id and split, or each file's sha256."""
    run = read_run(run_dir)
    chosen = [s for s in run.stages if stages is None or s.name in stages]
    rows: dict[tuple[str, str], list[str]] = {}
    for s in chosen:
        for name, d in _dataset_rows(s):
            spec = d.get("spec") or {}
            path = spec.get("path")
            if isinstance(path, str) and path:
                source = f"hub `{path}`" if looks_like_hub_id(path) else f"`{public(path)}`"
                extra = ", ".join(f"{k} {spec[k]}" for k in ("subset", "split", "revision") if spec.get(k))
                ident = extra + (
                    "; revision not pinned" if looks_like_hub_id(path) and not spec.get("revision") else ""
                )
            else:
                source = "local"
                hashes = {**(d.get("path_sha256") or {}), **(d.get("eval_path_sha256") or {})}
                ident = "<br>".join(f"`{public(f)}` sha256 `{h}`" for f, h in hashes.items())
            key = (name, source + ident)
            rows.setdefault(key, [f"`{name}`", source, ident or "-", ""])
            rows[key][3] = ", ".join(filter(None, [rows[key][3], f"`{s.name}`"]))
    return _table(["dataset", "source", "identity", "read by"], list(rows.values())) if rows else ""


def versions_table(run_dir: Path | Run, stages: list[str] | None = None) -> str:
    """Library versions from each stage's versions.json; a package whose version differs names each stage's."""
    run = read_run(run_dir)
    chosen = [s for s in run.stages if s.versions and (stages is None or s.name in stages)]
    packages = list(dict.fromkeys(p for s in chosen for p in s.versions))
    rows = []
    for p in packages:
        vals = {s.name: str(s.versions[p]) for s in chosen if p in s.versions}
        if len(set(vals.values())) == 1:
            rows.append([p, next(iter(vals.values()))])
        else:
            rows.append([p, ", ".join(f"{v} (`{n}`)" for n, v in vals.items())])
    return _table(["package", "version"], rows) if rows else ""


def recipe_record(run_dir: Path | Run) -> dict[str, Any]:
    """The recipe as run (run.json), else the stages' resolved configs; local paths made public."""
    run = read_run(run_dir)
    if run.record and isinstance(run.record.get("recipe"), dict):
        return public_data(run.record["recipe"])
    return public_data({"stages": [s.spec for s in run.stages if s.spec]})


def recipe_yaml(run_dir: Path | Run) -> str:
    """A fenced YAML block of the resolved recipe, with the command-line overrides it ran with."""
    run = read_run(run_dir)
    text = yaml.safe_dump(recipe_record(run_dir), sort_keys=False, allow_unicode=True)
    head = ""
    if run.record:
        head = f"Recipe file `{public(str(run.record.get('recipe_file', '?')))}`"
        overrides = run.record.get("overrides") or []
        head += (
            (", overrides: " + " ".join(f"`{public(str(o))}`" for o in overrides)) if overrides else ", no overrides"
        )
        head += ". Resolved (every default filled in):\n\n"
    else:
        head = "No run.json in this run: the stages' resolved configs (config.yaml) follow.\n\n"
    return head + "```yaml\n" + text + "```\n"


def git_line(run_dir: Path | Run) -> str:
    run = read_run(run_dir)
    git = (run.record or {}).get("git")
    if not isinstance(git, dict) or not git.get("commit"):
        return "not recorded (the recipe was not in a git repository, or the run predates run.json)"
    return f"`{git['commit']}`" + (" (with uncommitted changes)" if git.get("dirty") else "")


# ---------------------------------------------------------------- plots


def _series(log: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in log if isinstance(r.get(key), int | float) and isinstance(r.get("step"), int)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _first_key(log: list[dict[str, Any]], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if any(isinstance(r.get(k), int | float) for r in log)), None)


def plots(run_dir: Path | Run) -> list[Path]:
    """Write the run's PNGs into runs/<run>/report/ and return them: loss per training stage (eval loss where
    logged), reward / KL / entropy of the RL stages, reward accuracy of the reward and DPO-family stages, and
    one comparison per eval stage. Only what the run logged is drawn; a stage that logged nothing gets no panel."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from align.evaluation.plot import plot_results

    run = read_run(run_dir)
    out = run.folder / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()  # a stage removed from the recipe leaves no stale plot
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        for ax in fig.axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)

    trained = [s for s in run.stages if s.done and not is_eval(s) and s.log]
    losses = []
    for s in trained:
        keys = [k for k in ("loss", "policy_loss", "value_loss") if _series(s.log, k)[0]]
        keys = keys[:1] if "loss" in keys else keys
        if keys:
            losses.append((s, keys))
    if losses:
        fig, axes = plt.subplots(1, len(losses), figsize=(4.2 * len(losses), 3.2), squeeze=False)
        for ax, (s, keys) in zip(axes[0], losses, strict=True):
            for k in keys:
                ax.plot(*_series(s.log, k), marker=".", label=k if k != "loss" else "train loss")
            ex, ey = _series(s.log, "eval_loss")
            if ex:
                ax.plot(ex, ey, "o--", label="eval loss")
            ax.set(title=f"{s.name} ({s.type})", xlabel="step", ylabel="loss")
            ax.legend(fontsize=7)
        save(fig, "loss.png")

    rl = [s for s in run.stages if s.done and is_online_rl(s) and s.log]
    if rl:
        fig, axes = plt.subplots(len(rl), 3, figsize=(12, 3 * len(rl)), squeeze=False)
        for row, s in zip(axes, rl, strict=True):
            for ax, (title, keys) in zip(
                row, (("reward (mean)", LOGGED_REWARD), ("KL", ("kl",)), ("entropy", ("entropy",))), strict=True
            ):
                key = _first_key(s.log, keys)
                if key:
                    ax.plot(*_series(s.log, key), marker=".")
                else:
                    ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
                ax.set(title=f"{s.name} ({s.type}): {key or title}", xlabel="step")
        save(fig, "rl.png")

    pref = []
    for s in run.stages:
        held = next(((b, a) for b, a in HELDOUT_ACCURACY if a in s.headline), None)
        if s.done and (held or _first_key(s.log, LOGGED_ACCURACY)):
            pref.append((s, held))
    if pref:
        fig, axes = plt.subplots(1, len(pref), figsize=(4.2 * len(pref), 3.2), squeeze=False)
        for ax, (s, held) in zip(axes[0], pref, strict=True):
            key = _first_key(s.log, LOGGED_ACCURACY)
            if key:
                ax.plot(*_series(s.log, key), marker=".", label=f"train ({key})")
            m = s.headline
            if held and all(isinstance(m.get(k), int | float) for k in held):
                ax.plot([0, m.get("steps", 0)], [m.get(held[0]), m.get(held[1])], "s--", label="held-out before/after")
            elif ekey := _first_key(s.log, LOGGED_EVAL_ACCURACY):
                ax.plot(*_series(s.log, ekey), "s--", label=f"held-out ({ekey})")
            ax.set(title=f"{s.name} ({s.type})", xlabel="step", ylabel="reward accuracy", ylim=(-0.05, 1.05))
            ax.legend(fontsize=7)
        save(fig, "reward_accuracy.png")

    for s in run.evals:
        if s.results and plot_results(s.results, out / f"eval_{s.name}.png"):
            written.append(out / f"eval_{s.name}.png")
    return written


def plot_links(paths: list[Path], run_dir: Path) -> str:
    """Markdown images with links relative to the run folder (report.md, and a card pushed with report/)."""
    return "".join(f"\n![{p.stem}]({os.path.relpath(p, run_dir)})\n" for p in paths)


# ---------------------------------------------------------------- the report


def stage_details(run_dir: Path | Run) -> str:
    """Every metric each stage recorded in stage.json, one small table per stage."""
    parts = []
    for s in read_run(run_dir).stages:
        if not s.done:
            parts.append(f"### `{s.name}` ({s.type})\n\nnot done\n")
            continue
        rows = [[k, fmt(v)] for k, v in s.headline.items()]
        rows.append(["output_sha256", f"`{(s.info or {}).get('output_sha256', '-')}`"])
        rows.append(["finished", str((s.info or {}).get("finished", "-"))])
        parts.append(f"### `{s.name}` ({s.type})\n\n" + _table(["metric", "value"], rows))
    return "\n".join(parts)


def write_report(run_dir: Path) -> Path:
    """Write runs/<run>/report.md and its plots (runs/<run>/report/*.png); return report.md's path."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    pngs = {p.name: p for p in plots(run)}

    def links(*names: str) -> str:
        return plot_links([pngs[n] for n in names if n in pngs], run_dir)

    facts = [
        f"- base model: {base_label(run.base)}",
        f"- stages: {len(run.stages)} ({sum(s.done for s in run.stages)} done): "
        + " → ".join(f"`{s.name}` ({s.type})" for s in run.stages),
        f"- git commit: {git_line(run)}",
    ]
    if run.record is None:
        facts.append("- no run.json: stages are the folders with a stage.json, in the order they finished")
    parts = [f"# Run `{run.name}`\n", "\n".join(facts) + "\n", "## Stages\n\n" + stage_chain(run)]
    if table := training_table(run):
        parts.append("## Training\n\n" + table + links("loss.png"))
    if table := rl_table(run):
        parts.append("## Reward, KL and entropy (RL stages)\n\n" + table + links("rl.png"))
    if table := preference_table(run):
        parts.append("## Reward accuracy (held-out pairs)\n\n" + table + links("reward_accuracy.png"))
    evals = [n for n in pngs if n.startswith("eval_")]
    parts.append("## Evaluation\n\n" + results_table(run) + links(*evals))
    if table := datasets_table(run):
        parts.append("## Datasets\n\n" + table)
    if table := versions_table(run):
        parts.append("## Library versions\n\n" + table)
    parts.append("## Recipe\n\n" + recipe_yaml(run))
    parts.append("## Stage details\n\n" + stage_details(run))
    path = run_dir / "report.md"
    tmp = run_dir / "report.md.tmp"
    tmp.write_text("\n".join(parts))
    tmp.rename(path)
    return path
