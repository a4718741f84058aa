"""Malformed inputs to `align compare`, `align eval`, task files and model folders: exit 2, no traceback, the field
or file named in the message, and nothing computed. A few good inputs next to them must still pass.

Every case runs the CLI's `main()` in this process (a subprocess spends seconds on imports); one goes through a
real subprocess, as a user would run it. Each case writes its files in tmp_path; the tiny llama of conftest is the
valid model where a case needs one, so the one fault of the case is the only thing wrong.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT, align, sft_recipe, write_recipe

from align.cli import main
from align.evaluation.compare import SCHEMA

Build = Callable[[Path, Path], list[str]]  # (tmp, tiny model) -> argv


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Full-file check results are cached by content under $ALIGN_CACHE; keep each test's to itself."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


# ---------------------------------------------------------------- metrics files (align compare)


def record(**kw) -> dict:
    return {"target": "sft", "task": "mmlu", "task_version": 1, "metric": "accuracy", "value": 50.0, **kw}


def metrics(*recs: dict, **top) -> dict:
    return {"schema": SCHEMA, "results": list(recs) if recs else [record(stderr=1.0)], **top}


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def compare_with(baseline: Callable[[Path], Path], *extra: str) -> Build:
    """`align compare GOOD --baseline BAD`, the baseline written by `baseline(tmp)`."""

    def build(tmp: Path, model: Path) -> list[str]:
        good = write_json(tmp / "current.json", metrics())
        return ["compare", str(good), "--baseline", str(baseline(tmp)), *extra]

    return build


def bad_baseline(data) -> Build:
    return compare_with(lambda tmp: write_json(tmp / "baseline.json", data))


def bad_baseline_bytes(raw: bytes) -> Build:
    def write(tmp: Path) -> Path:
        (tmp / "baseline.json").write_bytes(raw)
        return tmp / "baseline.json"

    return compare_with(write)


def without(key: str) -> dict:
    r = record()
    del r[key]
    return r


def bad_current(data) -> Build:
    def build(tmp: Path, model: Path) -> list[str]:
        return [
            "compare",
            str(write_json(tmp / "cur.json", data)),
            "--baseline",
            str(write_json(tmp / "b.json", metrics())),
        ]

    return build


# ---------------------------------------------------------------- task files and eval targets (align eval)

MMLU_ROW = "What is 1+1?,1,2,3,4,B\n"


def mmlu_folder(tmp: Path, subjects=("algebra", "biology"), dev_rows: int | None = 2) -> Path:
    """test/ and dev/ CSV files per subject (no dev files with `dev_rows=None`)."""
    root = tmp / "mmlu"
    for s in subjects:
        (root / "test").mkdir(parents=True, exist_ok=True)
        (root / "dev").mkdir(parents=True, exist_ok=True)
        (root / "test" / f"{s}_test.csv").write_text(MMLU_ROW * 3)
        if dev_rows is not None:
            (root / "dev" / f"{s}_dev.csv").write_text(MMLU_ROW * dev_rows)
    return root


def mmlu_task(tmp: Path, extra: str = "", subjects: str = "[algebra]", fewshot: int = 1, **folder_kw) -> Path:
    root = mmlu_folder(tmp, **folder_kw)
    p = tmp / "mmlu_toy.yaml"
    p.write_text(
        f"name: mmlu_toy\ntype: mmlu\ndata: {{path: {root}, format: mmlu_csv, subjects: {subjects}}}\n"
        f"mmlu: {{num_fewshot: {fewshot}}}\n{extra}"
    )
    return p


def gen_task(tmp: Path, lines: list[str] | None = None, data: Path | None = None) -> Path:
    if data is None:
        data = tmp / "items.jsonl"
        good = json.dumps({"src": "Hallo", "refs": ["Hello"]})
        data.write_text("\n".join(lines if lines is not None else [good, good]) + "\n")
    p = tmp / "gen_toy.yaml"
    p.write_text(
        f"name: gen_toy\ntype: generation\ndata: {{path: {data}, format: jsonl, input_field: src, "
        "reference_field: refs}\nprompt: {template: 'Translate: {src}'}\nmetric: {name: chrf}\n"
    )
    return p


def eval_task(make: Callable[[Path], Path], *extra: str) -> Build:
    """`align eval TINY --tasks FILE`, the task file written by `make(tmp)`."""

    def build(tmp: Path, model: Path) -> list[str]:
        return ["eval", str(model), "--tasks", str(make(tmp)), "--out", str(tmp / "out"), *extra]

    return build


def task_text(text: str | bytes, name: str = "task.yaml") -> Build:
    def make(tmp: Path) -> Path:
        p = tmp / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
        return p

    return eval_task(make)


def eval_options(*extra: str) -> Build:
    return eval_task(lambda tmp: mmlu_task(tmp), *extra)


def eval_target(make: Callable[[Path, Path], Path]) -> Build:
    """`align eval TARGET --tasks GOOD`, the target folder made by `make(tmp, tiny model)`."""

    def build(tmp: Path, model: Path) -> list[str]:
        return ["eval", str(make(tmp, model)), "--tasks", str(mmlu_task(tmp)), "--out", str(tmp / "out")]

    return build


def copy_model(tmp: Path, model: Path, drop: tuple[str, ...] = (), name: str = "m") -> Path:
    dest = tmp / name
    shutil.copytree(model, dest)
    for pattern in drop:
        for f in dest.glob(pattern):
            f.unlink()
    return dest


def pickled_model(tmp: Path, model: Path) -> Path:
    dest = copy_model(tmp, model, drop=("*.safetensors",))
    (dest / "pytorch_model.bin").write_bytes(b"not really a pickle")
    return dest


def pickled_adapter(tmp: Path, model: Path) -> Path:
    dest = tmp / "adapter"
    dest.mkdir()
    cfg = {"peft_type": "LORA", "base_model_name_or_path": str(model), "r": 4, "target_modules": ["q_proj"]}
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    (dest / "adapter_model.bin").write_bytes(b"not really a pickle")
    for f in model.glob("tokenizer*"):
        shutil.copy(f, dest / f.name)
    return dest


def broken_adapter_config(tmp: Path, model: Path) -> Path:
    dest = pickled_adapter(tmp, model)
    (dest / "adapter_config.json").write_text("{not json")
    return dest


def bad_config(text: str) -> Callable[[Path, Path], Path]:
    def make(tmp: Path, model: Path) -> Path:
        dest = copy_model(tmp, model)
        (dest / "config.json").write_text(text)
        return dest

    return make


# ---------------------------------------------------------------- model folders (align plan)


def plan_model(make: Callable[[Path, Path], Path | str]) -> Build:
    """`align plan` of conftest's SFT recipe with `model:` set to what `make(tmp, tiny model)` gives."""

    def build(tmp: Path, model: Path) -> list[str]:
        return ["plan", str(write_recipe(tmp, sft_recipe(tmp, Path(str(make(tmp, model))))))]

    return build


def sharded_missing(tmp: Path, model: Path) -> Path:
    dest = copy_model(tmp, model)
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest


def a_file(tmp: Path, model: Path) -> Path:
    (tmp / "model.safetensors").write_bytes(b"x")
    return tmp / "model.safetensors"


def config_only(tmp: Path, model: Path) -> Path:
    dest = tmp / "cfg-only"
    dest.mkdir()
    shutil.copy(model / "config.json", dest / "config.json")
    return dest


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _plan_with_task(tmp: Path, model: Path, task: Path) -> list[str]:
    """`align plan` of conftest's recipe with an eval stage on `task` (a task file) added at the end."""
    r = sft_recipe(tmp, model)
    r["stages"].append({"name": "mmlu", "type": "eval", "tasks": [{"task": str(task)}]})
    return ["plan", str(write_recipe(tmp, r))]


def _empty_mmlu(tmp: Path) -> Path:
    p = mmlu_task(tmp)
    shutil.rmtree(tmp / "mmlu" / "test")
    return p


def _pt(folder: Path) -> Path:
    (folder / "weights.pt").write_bytes(b"pickle")
    return folder


# ---------------------------------------------------------------- the cases: (id, argv builder, must appear)

BAD: list[tuple[str, Build, list[str]]] = [
    # align compare: the baseline
    ("baseline-no-metric", bad_baseline(metrics(without("metric"))), ["baseline.json", "results[0]", "`metric`"]),
    ("baseline-no-value", bad_baseline(metrics(without("value"))), ["baseline.json", "results[0]", "`value`"]),
    ("baseline-no-task", bad_baseline(metrics(without("task"))), ["baseline.json", "results[0]", "`task`"]),
    ("baseline-string-value", bad_baseline(metrics(record(value="0.5"))), ["baseline.json", "results[0].value"]),
    ("baseline-null-value", bad_baseline(metrics(record(value=None))), ["results[0].value", "null"]),
    (
        "baseline-nan-value",
        bad_baseline_bytes(
            b'{"schema": "align.metrics/1", "results": [{"task": "mmlu", "metric": "accuracy", "value": NaN}]}'
        ),
        ["results[0].value", "finite"],
    ),
    ("baseline-second-record", bad_baseline(metrics(record(), record(task="x", metric=3))), ["results[1].metric"]),
    ("baseline-results-mapping", bad_baseline({"schema": SCHEMA, "results": {"a": 1}}), ["baseline.json", "results"]),
    ("baseline-record-list", bad_baseline(metrics(["mmlu", "accuracy", 1.0])), ["results[0]", "mapping"]),
    ("baseline-json-array", bad_baseline([record()]), ["baseline.json", "not an align metrics file"]),
    ("baseline-not-json", bad_baseline_bytes(b"{oops"), ["baseline.json", "not valid JSON", "line 1"]),
    ("baseline-binary", bad_baseline_bytes(b"\x00\x01\x02binary"), ["baseline.json", "binary"]),
    ("baseline-latin1", bad_baseline_bytes(b'{"schema": "caf\xe9"}'), ["baseline.json", "UTF-8"]),
    ("baseline-missing", compare_with(lambda tmp: tmp / "nope.json"), ["--baseline", "nope.json", "does not exist"]),
    ("baseline-hib-string", bad_baseline(metrics(record(higher_is_better="no"))), ["results[0].higher_is_better"]),
    ("baseline-neg-stderr", bad_baseline(metrics(record(stderr=-1))), ["results[0].stderr"]),
    ("baseline-duplicate", bad_baseline(metrics(record(), record())), ["results[1]", "repeats", "results[0]"]),
    ("baseline-empty", bad_baseline(metrics(results=[])), ["baseline", "no results"]),
    ("baseline-bad-tolerance", bad_baseline(metrics(tolerances={"accuracy": "lots"})), ["tolerances.accuracy", "lots"]),
    (
        "tolerance-not-spec",
        compare_with(lambda t: write_json(t / "b.json", metrics()), "--tolerance", "accuracy"),
        ["--tolerance", "METRIC=SPEC"],
    ),
    (
        "tolerance-bad-number",
        compare_with(lambda t: write_json(t / "b.json", metrics()), "--tolerance", "accuracy=x"),
        ["--tolerance accuracy", "not a number"],
    ),
    (
        "tolerance-negative",
        compare_with(lambda t: write_json(t / "b.json", metrics()), "--tolerance", "accuracy=-1"),
        ["--tolerance accuracy", ">= 0"],
    ),
    (
        "tolerance-unknown-metric",
        compare_with(lambda t: write_json(t / "b.json", metrics()), "--tolerance", "acuracy=2%"),
        ["--tolerance", "acuracy", "did you mean `accuracy`"],
    ),
    # align compare: the current metrics
    ("current-no-value", bad_current(metrics(without("value"))), ["CURRENT", "cur.json", "results[0]", "`value`"]),
    ("current-string-task", bad_current(metrics(record(task=7))), ["cur.json", "results[0].task"]),
    # align eval: options
    ("eval-limit-0", eval_options("--limit", "0"), ["--limit", "at least 1", "got 0"]),
    ("eval-limit-negative", eval_options("--limit", "-1"), ["--limit", "at least 1", "got -1"]),
    (
        "eval-out-is-file",
        lambda tmp, m: [*eval_options()(tmp, m)[:-2], "--out", str(write_json(tmp / "o", {}))],
        ["--out", "is a file"],
    ),
    ("eval-bad-baseline", eval_options("--baseline", "/nonexistent/b.json"), ["--baseline", "b.json"]),
    (
        "eval-unknown-task",
        lambda tmp, m: ["eval", str(m), "--tasks", "mmlu_shared6", "--out", str(tmp / "o")],
        ["--tasks mmlu_shared6", "known", "mmlu_shared5"],
    ),
    (
        "eval-task-twice",
        lambda tmp, m: ["eval", str(m), "--tasks", str(mmlu_task(tmp)), str(tmp / "mmlu_toy.yaml")],
        ["--tasks", "more than once"],
    ),
    ("eval-missing-target", eval_target(lambda tmp, m: tmp / "no-such-run"), ["TARGET", "no-such-run", "not exist"]),
    (
        "eval-missing-relative-target",
        lambda tmp, m: ["eval", "./nope/run", "--tasks", str(mmlu_task(tmp))],
        ["TARGET ./nope/run", "not exist"],
    ),
    ("eval-target-pickled-model", eval_target(pickled_model), ["TARGET", "pytorch_model.bin", "safetensors"]),
    ("eval-target-pickled-adapter", eval_target(pickled_adapter), ["TARGET", "adapter_model.bin", "safetensors only"]),
    ("eval-target-adapter-bad-json", eval_target(broken_adapter_config), ["adapter_config.json", "not valid JSON"]),
    ("eval-target-config-not-json", eval_target(bad_config("{")), ["TARGET", "config.json", "not valid JSON"]),
    (
        "eval-target-no-tokenizer",
        eval_target(lambda t, m: copy_model(t, m, drop=("tokenizer*", "*.jinja"))),
        ["TARGET", "no tokenizer"],
    ),
    # task files
    (
        "task-yaml-syntax",
        task_text("name: x\ntype: mmlu\ndata: {path: d, format: mmlu_csv\n"),
        ["task.yaml", "YAML syntax error", "line"],
    ),
    ("task-yaml-tab", task_text("name: x\n\ttype: mmlu\n"), ["task.yaml", "YAML syntax error", "line 2"]),
    ("task-top-level-list", task_text("- name: x\n- type: mmlu\n"), ["task.yaml", "mapping", "list"]),
    ("task-empty-file", task_text(""), ["task.yaml", "mapping", "empty"]),
    ("task-binary", task_text(b"\x00\x01PK\x03\x04"), ["task.yaml", "binary"]),
    ("task-not-utf8", task_text(b"name: caf\xe9\n"), ["task.yaml", "UTF-8", "line 1"]),
    ("task-duplicate-key", task_text("name: a\nname: b\ntype: mmlu\n"), ["task.yaml", "duplicate key `name`"]),
    ("task-unknown-field", eval_task(lambda tmp: mmlu_task(tmp, extra="limt: 3\n")), ["mmlu_toy.yaml", "limt"]),
    ("task-missing-file", eval_task(lambda tmp: tmp / "absent.yaml"), ["--tasks", "absent.yaml", "not found"]),
    ("task-data-missing", eval_task(lambda tmp: gen_task(tmp, data=tmp / "gone.jsonl")), ["gen_toy", "gone.jsonl"]),
    (
        "task-data-bad-row",
        eval_task(lambda tmp: gen_task(tmp, ['{"src": "a", "refs": ["b"]}', '{"src": '])),
        ["gen_toy.yaml", "items.jsonl:2", "not valid JSON"],
    ),
    (
        "task-data-missing-field",
        eval_task(lambda tmp: gen_task(tmp, ['{"source": "a", "refs": ["b"]}'])),
        ["items.jsonl:1", "'src'"],
    ),
    (
        "task-perplexity-type",
        task_text("name: p\ntype: perplexity\ndata: {path: /x.jsonl, format: jsonl, text_field: t}\n"),
        ["--tasks", "perplexity"],
    ),
    # MMLU subjects
    (
        "mmlu-unknown-subject",
        eval_task(lambda tmp: mmlu_task(tmp, subjects="[algebr]")),
        ["data.subjects", "'algebr'", "did you mean `algebra`", "available: algebra, biology"],
    ),
    ("mmlu-few-dev-rows", eval_task(lambda tmp: mmlu_task(tmp, fewshot=5)), ["num_fewshot is 5", "algebra_dev.csv"]),
    ("mmlu-empty-dev-file", eval_task(lambda tmp: mmlu_task(tmp, dev_rows=0)), ["only 0 row(s)", "algebra_dev.csv"]),
    ("mmlu-no-dev-file", eval_task(lambda tmp: mmlu_task(tmp, dev_rows=None)), ["num_fewshot", "has no algebra_dev"]),
    ("mmlu-no-test-files", eval_task(_empty_mmlu), ["mmlu", "no test/<subject>_test.csv"]),
    (
        "plan-mmlu-unknown-subject",
        lambda tmp, m: _plan_with_task(tmp, m, mmlu_task(tmp, subjects="[biolgy]")),
        ["(mmlu).tasks[0].task", "'biolgy'", "did you mean `biology`"],
    ),
    (
        "plan-task-yaml-syntax",
        lambda tmp, m: _plan_with_task(tmp, m, _write(tmp / "t.yaml", "name: [x\n")),
        ["(mmlu).tasks[0].task", "t.yaml", "YAML syntax error"],
    ),
    # model folders at plan time
    ("model-config-only", plan_model(config_only), ["model", "cfg-only", "no weights"]),
    (
        "model-no-safetensors",
        plan_model(lambda t, m: copy_model(t, m, drop=("*.safetensors",))),
        ["model", "no weights"],
    ),
    ("model-pickle-only", plan_model(pickled_model), ["model", "pytorch_model.bin", "convert them to safetensors"]),
    ("model-pt-only", plan_model(lambda t, m: _pt(copy_model(t, m, drop=("*.safetensors",)))), ["model", "weights.pt"]),
    ("model-config-invalid", plan_model(bad_config('{"model_type": "llama",')), ["model", "config.json", "line 1"]),
    ("model-config-list", plan_model(bad_config("[1, 2]")), ["model", "config.json", "JSON object", "list"]),
    ("model-config-no-type", plan_model(bad_config('{"hidden_size": 32}')), ["model", "config.json", "model_type"]),
    ("model-is-a-file", plan_model(a_file), ["model", "is a file"]),
    ("model-missing-folder", plan_model(lambda t, m: t / "not-here"), ["model", "not-here", "does not exist"]),
    ("model-missing-shard", plan_model(sharded_missing), ["model", "model-00002-of-00002.safetensors"]),
    ("model-no-tokenizer", plan_model(lambda t, m: copy_model(t, m, drop=("tokenizer*",))), ["model", "no tokenizer"]),
]


@pytest.mark.parametrize(("build", "want"), [pytest.param(b, w, id=i) for i, b, w in BAD])
def test_bad_input_is_refused_naming_it(build: Build, want: list[str], tmp_path, tiny_llama, capsys) -> None:
    argv = build(tmp_path, tiny_llama)
    rc, out = run_cli(argv, capsys)
    assert rc == 2, out
    assert "Traceback" not in out, out
    for w in want:
        assert w in out, f"{w!r} not in:\n{out}"
    assert not (tmp_path / "out" / "metrics.json").exists()  # nothing was evaluated


def test_bad_baseline_through_the_real_cli(tmp_path) -> None:
    good = write_json(tmp_path / "current.json", metrics())
    bad = write_json(tmp_path / "b.json", metrics(record(value="high")))
    res = align("compare", str(good), "--baseline", str(bad))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "b.json: results[0].value must be a finite number" in res.stderr


# ---------------------------------------------------------------- good inputs still pass


def test_good_compare_passes_and_a_regression_exits_1(tmp_path, capsys) -> None:
    base = write_json(tmp_path / "b.json", metrics(record(stderr=1.0, value=50.0), tolerances={"accuracy": "1se"}))
    same = write_json(tmp_path / "same.json", metrics(record(stderr=1.0, value=49.5)))
    worse = write_json(tmp_path / "worse.json", metrics(record(stderr=1.0, value=40.0)))
    assert run_cli(["compare", str(same), "--baseline", str(base)], capsys)[0] == 0
    assert run_cli(["compare", str(same), "--baseline", str(base), "--tolerance", "mmlu/accuracy=1"], capsys)[0] == 0
    rc, out = run_cli(["compare", str(worse), "--baseline", str(base)], capsys)
    assert rc == 1 and "REGRESSED" in out
    # a NaN stderr (one item) means no stderr: the 1% default applies, not a NaN tolerance that passes anything
    nan_base = write_json(tmp_path / "nan.json", metrics(record(stderr=float("nan"), value=50.0)))
    nan_worse = write_json(tmp_path / "nan-worse.json", metrics(record(stderr=float("nan"), value=40.0)))
    assert run_cli(["compare", str(nan_worse), "--baseline", str(nan_base)], capsys)[0] == 1
    # the committed baseline is a valid metrics file, and compares with itself
    committed = ROOT / "evaluation" / "baselines" / "regression.json"
    assert run_cli(["compare", str(committed), "--baseline", str(committed)], capsys)[0] == 0


def test_good_eval_runs_with_limit_and_gates_on_its_own_baseline(tmp_path, tiny_llama, capsys) -> None:
    task = mmlu_task(tmp_path, subjects="[algebra, biology]")
    rc, out = run_cli(
        ["eval", str(tiny_llama), "--tasks", str(task), "--limit", "1", "--out", str(tmp_path / "o")], capsys
    )
    assert rc == 0, out
    data = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert {r["task"] for r in data["results"]} == {"mmlu_toy", "mmlu_toy/algebra", "mmlu_toy/biology"}
    assert all(r["n"] == 1 for r in data["results"] if "/" in r["task"])
    base = tmp_path / "o" / "metrics.json"
    rc, out = run_cli(
        [
            "eval",
            str(tiny_llama),
            "--tasks",
            str(task),
            "--limit",
            "1",
            "--out",
            str(tmp_path / "o2"),
            "--baseline",
            str(base),
        ],
        capsys,
    )
    assert rc == 0 and "passed, 0 regressed" in out, out


def test_good_model_folders_and_task_files_load(tmp_path, tiny_llama, capsys) -> None:
    from align.evaluation.tasks import load_task
    from align.models import check_adapter_folder, check_model_folder, resolve_model

    assert check_model_folder(tiny_llama)["model_type"] == "llama"
    assert resolve_model(str(tiny_llama)).kind == "local"
    # planning memory from config.json alone is still possible when asked for
    assert resolve_model(str(config_only(tmp_path, tiny_llama)), estimate_only=True).note
    adapter = pickled_adapter(tmp_path, tiny_llama)
    (adapter / "adapter_model.bin").unlink()
    (adapter / "adapter_model.safetensors").write_bytes(b"")  # only the file is looked at, never loaded
    assert check_adapter_folder(adapter)["peft_type"] == "LORA"
    # a trainer's own pickles beside safetensors weights are not the weights: the folder is fine
    ok = copy_model(tmp_path, tiny_llama, name="with-args")
    (ok / "training_args.bin").write_bytes(b"pickle")
    check_model_folder(ok)
    assert load_task(mmlu_task(tmp_path, subjects="[biology, algebra]")).data.subjects == ["biology", "algebra"]
    assert load_task(gen_task(tmp_path)).name == "gen_toy"
    rc, out = run_cli(["plan", str(write_recipe(tmp_path, sft_recipe(tmp_path, tiny_llama)))], capsys)
    assert rc == 0, out


def test_quickstart_still_plans(capsys) -> None:
    rc, out = run_cli(["plan", str(ROOT / "recipes" / "quickstart.yaml")], capsys)
    assert rc == 0, out
