"""Malformed recipes and data files: `align plan` refuses each with exit 2, no traceback, and the field or file named.

Most cases run the CLI's `main()` in this process (an `align plan` subprocess spends seconds on imports); a few go
through a real subprocess, as a user would run it. Each case writes its own files in tmp_path next to the tiny
llama (hidden size 32) and the two-stage SFT recipe of conftest.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import align, alpaca_rows, plan_in_process, sft_recipe, write_jsonl, write_recipe

from align import data as align_data
from align.data import check_format, preference_row, row_issue, to_preference
from align.spec import DatasetSpec

Build = Callable[[Path, Path], Path]  # (tmp, model) -> recipe file


pytestmark = pytest.mark.usefixtures("own_cache")
plan = plan_in_process


# ---------------------------------------------------------------- builders


def recipe(change: Callable[[dict], Any] | None = None, *, pairs: list[dict] | None = None) -> Build:
    """The SFT recipe of conftest (with a DPO stage on `pairs` when given), changed in place by `change`."""

    def build(tmp: Path, model: Path) -> Path:
        r = sft_recipe(tmp, model)
        if pairs is not None:
            write_jsonl(tmp / "pairs.jsonl", pairs)
            r["datasets"]["pairs"] = {"path": str(tmp / "pairs.jsonl")}
            r["stages"].insert(1, {**r["stages"][0], "name": "dpo", "type": "dpo", "data": "pairs"})
        if change is not None:
            change(r)
        return write_recipe(tmp, r)

    return build


def train(**kw: Any) -> Build:
    return recipe(lambda r: r["stages"][0]["train"].update(kw))


def top(**kw: Any) -> Build:
    return recipe(lambda r: r.update(kw))


def adapter(**kw: Any) -> Build:
    return recipe(lambda r: r["stages"][0]["adapter"].update(kw))


def yaml_text(edit: Callable[[str], str | bytes]) -> Build:
    """The recipe as YAML text, edited as text (for what a dict cannot hold: duplicate keys, bad bytes)."""

    def build(tmp: Path, model: Path) -> Path:
        r = sft_recipe(tmp, model)
        r["output_dir"] = str(tmp / "runs")
        out = edit(yaml.safe_dump(r, sort_keys=False))
        p = tmp / "recipe.yaml"
        p.write_bytes(out if isinstance(out, bytes) else out.encode())
        return p

    return build


def raw_recipe(content: bytes) -> Build:
    def build(tmp: Path, model: Path) -> Path:
        (tmp / "recipe.yaml").write_bytes(content)
        return tmp / "recipe.yaml"

    return build


def extends(parent: bytes | str) -> Build:
    """A recipe whose `extends:` names a file holding `parent`."""

    def build(tmp: Path, model: Path) -> Path:
        (tmp / "parent.yaml").write_bytes(parent if isinstance(parent, bytes) else parent.encode())
        r = sft_recipe(tmp, model)
        r["extends"] = "parent.yaml"
        return write_recipe(tmp, r)

    return build


def data(name: str, content: str | bytes | Callable[[], str | bytes], dataset: str = "train", **spec: Any) -> Build:
    """The recipe with dataset `dataset` pointing at a file `name` holding `content`."""

    def change(tmp: Path) -> Callable[[dict], None]:
        def go(r: dict) -> None:
            f = tmp / "d" / name
            f.parent.mkdir(parents=True, exist_ok=True)
            body = content() if callable(content) else content
            f.write_bytes(body if isinstance(body, bytes) else body.encode())
            r["datasets"][dataset] = {"path": str(f), **spec}

        return go

    def build(tmp: Path, model: Path) -> Path:
        return recipe(change(tmp), pairs=PAIRS if dataset == "pairs" else None)(tmp, model)

    return build


def lines(rows: list[Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def corrupt(n: int, total: int, rows: list[dict] | None = None) -> str:
    out = [json.dumps(r) for r in (rows or alpaca_rows(total))]
    out[n - 1] = out[n - 1][:-5]  # cut off the end of line n
    return "\n".join(out) + "\n"


def folder(files: dict[str, str]) -> Build:
    def build(tmp: Path, model: Path) -> Path:
        for name, body in files.items():
            (tmp / "folder" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / "folder" / name).write_text(body)
        return recipe(lambda r: r["datasets"]["train"].update(path=str(tmp / "folder")))(tmp, model)

    return build


def eval_task(task: dict, data_body: str) -> Build:
    """The recipe with a task file (`task`, data in gen.jsonl holding `data_body`) added to its eval stage."""

    def change(tmp: Path) -> Callable[[dict], None]:
        def go(r: dict) -> None:
            (tmp / "gen.jsonl").write_text(data_body)
            where = {"path": str(tmp / "gen.jsonl"), "format": "jsonl", **task.get("data", {})}
            (tmp / "gen_task.yaml").write_text(yaml.safe_dump({"name": "gen", "version": 1, **task, "data": where}))
            r["stages"][1]["tasks"].append({"task": str(tmp / "gen_task.yaml")})

        return go

    return lambda tmp, model: recipe(change(tmp))(tmp, model)


GEN = {
    "type": "generation",
    "data": {"input_field": "source", "reference_field": "target"},
    "prompt": {"template": "Q: {source}\nA:"},
    "metric": {"name": "bleu"},
}

GOOD = alpaca_rows()
PAIRS = [{"prompt": f"Add {i} and 7.", "chosen": f"{i + 7}.", "rejected": "Apple."} for i in range(20)]
MSG = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5."}]


def with_nulls(k: int, n: int = 48) -> str:
    return lines(alpaca_rows(n - k) + [{**GOOD[0], "output": None}] * k)


def eval_file(r: dict, body: str) -> None:
    f = Path(r["datasets"]["pairs"]["path"]).with_name("ev.jsonl")
    f.write_text(body)
    r["datasets"]["pairs"]["eval_path"] = str(f)


def mixture(**w: float) -> Build:
    return recipe(lambda r: r["stages"][0].update(data=w))


# ---------------------------------------------------------------- cases: (builder, what the message must name)

RECIPE_CASES = {
    # value ranges the trainer would take without a word
    "lr-negative": (train(learning_rate=-1e-3), "stages[0](sft).train.learning_rate"),
    "lr-zero": (train(learning_rate=0), "stages[0](sft).train.learning_rate"),
    "lr-quoted-negative": (train(learning_rate="-2e-5"), "stages[0](sft).train.learning_rate"),
    "lr-infinite": (train(learning_rate=float("inf")), "stages[0](sft).train.learning_rate"),
    "batch-zero": (train(per_device_train_batch_size=0), "stages[0](sft).train.per_device_train_batch_size"),
    "eval-batch-negative": (train(per_device_eval_batch_size=-1), "train.per_device_eval_batch_size"),
    "accumulation-zero": (train(gradient_accumulation_steps=0), "train.gradient_accumulation_steps"),
    "max-steps-minus-5": (train(max_steps=-5), "stages[0](sft).train.max_steps"),
    "max-steps-zero": (train(max_steps=0), "stages[0](sft).train.max_steps"),
    "epochs-zero": (train(max_steps=-1, num_train_epochs=0), "train.num_train_epochs"),
    "train-seed-negative": (train(seed=-1), "stages[0](sft).train.seed"),
    "train-seed-huge": (train(seed=2**40), "stages[0](sft).train.seed"),
    "warmup-steps-negative": (train(warmup_steps=-2), "train.warmup_steps"),
    "weight-decay-negative": (train(weight_decay=-0.1), "train.weight_decay"),
    "max-length-zero": (train(max_length=0), "train.max_length"),
    "save-steps-zero": (train(save_steps=0), "train.save_steps"),
    "seed-2-70": (top(seed=2**70), "seed"),
    "seed-negative": (top(seed=-3), "seed"),
    "lora-r-1e12": (adapter(r=1e12), "stages[0](sft).adapter.r"),
    "lora-r-zero": (adapter(r=0), "stages[0](sft).adapter.r"),
    "lora-r-above-hidden": (adapter(r=64), "stages[0](sft).adapter.r"),  # tiny llama: hidden size 32
    "mixture-weight-zero": (mixture(train=0, held=1), "stages[0](sft).data.train"),
    "mixture-weight-negative": (mixture(train=1, held=-1), "stages[0](sft).data.held"),
    "trust-remote-code-yes": (top(model={"name_or_path": "M", "trust_remote_code": "yes"}), "trust_remote_code"),
    "trust-remote-code-1": (top(model={"name_or_path": "M", "trust_remote_code": 1}), "trust_remote_code"),
    # shapes
    "datasets-list": (top(datasets=[{"path": "train.jsonl"}]), "datasets"),
    "datasets-string": (top(datasets="train.jsonl"), "datasets"),
    "stages-int": (top(stages=5), "stages"),
    "stage-type-list": (recipe(lambda r: r["stages"][0].update(type=["sft"])), "stages[0](sft).type"),
    # the file itself
    "top-level-list": (raw_recipe(b"- name: a\n- name: b\n"), "recipe.yaml"),
    "top-level-scalar": (raw_recipe(b"just a string\n"), "recipe.yaml"),
    "empty-file": (raw_recipe(b""), "recipe.yaml"),
    "not-utf8": (yaml_text(lambda t: t.encode().replace(b"tiny", b"ti\xffny", 1)), "recipe.yaml"),
    "binary": (raw_recipe(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"), "recipe.yaml"),
    "latin1": (yaml_text(lambda t: t.replace("name: tiny", "description: caf\xe9").encode("latin-1")), "not UTF-8"),
    "extends-binary": (extends(b"\x00\x01\x02\x03"), "parent.yaml"),
    "extends-not-utf8": (extends(b"seed: 1\ndescription: \xff\xfe\n"), "parent.yaml"),
    "extends-list": (extends("- a\n- b\n"), "parent.yaml"),
    "extends-not-a-path": (recipe(lambda r: r.update(extends=["a.yaml"])), "extends"),
    "duplicate-top-key": (yaml_text(lambda t: t.replace("name: tiny\n", "name: tiny\nname: other\n", 1)), "`name`"),
    "duplicate-train-key": (
        yaml_text(lambda t: t.replace("    max_steps: 6\n", "    max_steps: 6\n    max_steps: 7\n")),
        "duplicate key `max_steps`",
    ),
    "duplicate-dataset": (
        yaml_text(lambda t: t.replace("datasets:\n", "datasets:\n  held:\n    path: x.jsonl\n", 1)),
        "duplicate key `held`",
    ),
}

DATA_CASES = {
    # parse errors name the file and the line
    "jsonl-corrupt-line-21": (data("train.jsonl", corrupt(21, 48)), "train.jsonl line 21"),
    "jsonl-corrupt-line-1101": (data("train.jsonl", lambda: corrupt(1101, 1200)), "train.jsonl line 1101"),
    "jsonl-not-utf8": (data("train.jsonl", lines(GOOD).encode().replace(b"meters", b"m\xe8tres", 3)), "line 1"),
    "jsonl-nan": (data("train.jsonl", lines(GOOD) + '{"instruction": "a", "output": NaN}\n'), "train.jsonl line 49"),
    "jsonl-row-is-list": (data("train.jsonl", lines(GOOD[:3]) + "[1, 2]\n"), "train.jsonl line 4"),
    "jsonl-row-is-number": (data("train.jsonl", lines(GOOD[:3]) + "7\n"), "train.jsonl line 4"),
    "json-array-of-lists": (data("train.json", json.dumps([[1, 2], [3, 4]])), "train.json item 1"),
    "json-array-mixed": (data("train.json", json.dumps([GOOD[0], [3, 4]])), "train.json item 2"),
    "json-scalar": (data("train.json", "42"), "train.json"),
    "json-one-object": (
        data("train.json", json.dumps({"instruction": ["a"], "output": ["b"]}, indent=2)),
        "train.json",
    ),
    "json-array-syntax": (data("train.json", json.dumps(GOOD, indent=1)[:-40]), "train.json line"),
    "csv-ragged": (data("train.csv", "instruction,input,output\na,,b\nc,d\n"), "train.csv line 3"),
    "csv-ragged-long": (data("train.csv", "instruction,input,output\na,,b\nc,d,e,f\n"), "train.csv line 3"),
    "csv-empty-header-name": (data("train.csv", "instruction,,output\na,,b\n"), "train.csv line 1"),
    "csv-not-utf8": (data("train.csv", b"instruction,input,output\na,,b\nc\xff,,d\n"), "train.csv line 3"),
    "parquet-garbage": (data("train.parquet", b"PAR1 not really parquet"), "train.parquet"),
    "missing-file": (recipe(lambda r: r["datasets"]["train"].update(path="./nowhere.jsonl")), "nowhere.jsonl"),
    "jsonl-empty": (data("train.jsonl", ""), "empty"),
    "blank-lines-only": (data("train.jsonl", "\n\n  \n"), "empty"),
    "unsupported-suffix": (data("train.txt", "hello\n"), "datasets.train"),
    # types of the columns the format uses
    "int-instruction": (data("train.jsonl", lines([{**r, "instruction": 5} for r in GOOD])), "`instruction`"),
    "list-output-mixed-kinds": (data("train.jsonl", lines(GOOD[:3] + [{**GOOD[0], "output": ["x"]}])), "`output`"),
    "messages-no-role": (data("m.jsonl", lines([{"messages": [{"content": "hi"}, MSG[1]]}] * 4)), "role"),
    "messages-role-typo": (
        data("m.jsonl", lines([{"messages": [{"role": "usr", "content": "hi"}, MSG[1]]}] * 4)),
        "role `usr` (did you mean `user`?)",
    ),
    "messages-no-content": (data("m.jsonl", lines([{"messages": [MSG[0], {"role": "assistant"}]}] * 4)), "content"),
    "messages-int-content": (
        data("m.jsonl", lines([{"messages": MSG}] * 3 + [{"messages": [MSG[0], {"role": "assistant", "content": 5}]}])),
        "m.jsonl line 4",
    ),
    "messages-not-list": (data("m.jsonl", lines([{"messages": "hello"}] * 3)), "messages"),
    "messages-no-assistant": (data("m.jsonl", lines([{"messages": MSG[:1]}] * 5)), "assistant turn"),
    "prompt-completion-int": (data("pc.jsonl", lines([{"prompt": 1, "completion": "x"}] * 3)), "`prompt`"),
    # unusable rows: refused above 10% (or all), showing where
    "output-null-every-row": (data("train.jsonl", lines([{**r, "output": None} for r in GOOD])), "`output`"),
    "output-null-20-percent": (data("train.jsonl", with_nulls(10)), "train.jsonl lines 39, 40"),
    "all-empty-strings": (data("train.jsonl", lines([{"instruction": "", "input": "", "output": ""}] * 9)), "empty"),
    "text-whitespace": (data("t.jsonl", lines([{"text": "   "}] * 6)), "empty `text`"),
    "csv-empty-cells": (data("train.csv", "instruction,input,output\n" + "a,,\n" * 5), "`output`"),
    # folders
    "folder-different-columns": (
        folder({"a.jsonl": lines(GOOD), "b.jsonl": lines([{"text": "x"}] * 3)}),
        "b.jsonl",
    ),
    "folder-corrupt-second-file": (folder({"a.jsonl": lines(GOOD), "b.jsonl": corrupt(3, 5)}), "b.jsonl line 3"),
    "folder-mixed-types": (folder({"a.jsonl": lines(GOOD), "b.csv": "instruction,output\na,b\n"}), "mixes"),
    "folder-empty": (folder({"notes.txt": "nothing here"}), "holds no"),
    # preference pairs (a dpo stage)
    "pairs-int-prompt": (data("p.jsonl", lines([{**p, "prompt": 3} for p in PAIRS]), "pairs"), "`prompt`"),
    "pairs-int-chosen": (data("p.jsonl", lines([{**p, "chosen": 3} for p in PAIRS]), "pairs"), "`chosen`"),
    "pairs-chosen-equals-rejected": (
        data("p.jsonl", lines([{**p, "rejected": p["chosen"]} for p in PAIRS]), "pairs"),
        "chosen == rejected",
    ),
    "pairs-message-without-role": (
        data("p.jsonl", lines([{"chosen": [{"content": "a"}], "rejected": [{"content": "b"}]}] * 3), "pairs"),
        "role",
    ),
    "pairs-hh-no-shared-turn": (
        data("p.jsonl", lines([{"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: b"}] * 4), "pairs"),
        "Assistant",
    ),
    "pairs-empty-rejected": (data("p.jsonl", lines([{**p, "rejected": ""} for p in PAIRS]), "pairs"), "`rejected`"),
    "pairs-eval-path-corrupt": (
        recipe(lambda r: eval_file(r, corrupt(2, 4, PAIRS[:4])), pairs=PAIRS),
        "datasets.pairs.eval_path: ev.jsonl line 2",
    ),
    "pairs-eval-path-other-format": (recipe(lambda r: eval_file(r, lines(GOOD)), pairs=PAIRS), "eval_path"),
    # task files in a recipe's eval stage: every record checked at plan time, as `align eval` does
    "eval-task-corrupt-record": (
        eval_task(GEN, lines([{"source": "a", "target": "b"}] * 3) + '{"source": "c", "target"\n'),
        "gen.jsonl",
    ),
    "eval-task-missing-reference": (eval_task(GEN, lines([{"source": "a", "target": "b"}, {"source": "c"}])), "target"),
    "eval-task-perplexity-type": (
        eval_task({"type": "perplexity", "data": {"text_field": "source"}}, lines([{"source": "a"}])),
        "tasks[1].task",
    ),
}


BAD_CASES = {**{f"recipe-{k}": v for k, v in RECIPE_CASES.items()}, **{f"data-{k}": v for k, v in DATA_CASES.items()}}


@pytest.mark.parametrize("build,named", BAD_CASES.values(), ids=BAD_CASES.keys())
def test_bad_input_is_refused(build, named, tmp_path, tiny_llama, capsys):
    rc, text = plan(build(tmp_path, tiny_llama), capsys)
    assert rc == 2, text
    assert "Traceback" not in text
    assert named in text, text


def test_messages_name_the_stage_and_show_few_rows(tmp_path, tiny_llama, capsys):
    rc, text = plan(data("train.jsonl", lines([{**r, "output": None} for r in GOOD]))(tmp_path, tiny_llama), capsys)
    assert rc == 2 and "datasets.train" in text and "used by stage `sft`" in text
    assert "lines 1, 2, 3, 4, 5 (+43 more)" in text


# ---------------------------------------------------------------- what still plans


def test_good_recipe_plans(tmp_path, tiny_llama, capsys):
    rc, text = plan(recipe()(tmp_path, tiny_llama), capsys)
    assert rc == 0, text


@pytest.mark.parametrize(
    "build",
    [
        train(max_steps=-1, num_train_epochs=1),  # -1: train for num_train_epochs, as transformers reads it
        train(learning_rate="2e-5", seed=0),
        top(seed=2**32 - 1),
        adapter(r=32),  # equal to the hidden size
        mixture(train=0.5, held=2),
        data("train.json", json.dumps(GOOD)),  # an array of objects
        data("t.json", json.dumps(["a line of text"] * 5)),  # an array of strings: the loader reads `text`
        data("train.jsonl", "\ufeff" + lines(GOOD)),  # a BOM, which the loader drops
        data("train.csv", "instruction,input,output\n" + "".join(f'"Add, {i}",,"{i}"\n' for i in range(8))),
        data("m.jsonl", lines([{"messages": MSG}] * 4)),
        data(
            "p.jsonl",
            lines([{"chosen": [MSG[0], MSG[1]], "rejected": [MSG[0], {**MSG[1], "content": "6."}]}] * 4),
            "pairs",
        ),  # implicit prompt: the shared turns
        yaml_text(
            lambda t: t.replace("  train:\n", "  train: &t\n", 1).replace("  held:\n", "  held:\n    <<: *t\n", 1)
        ),
    ],
    ids=[
        "max-steps-minus-1",
        "quoted-lr",
        "seed-max",
        "r-equals-hidden",
        "weights",
        "json-array",
        "json-strings",
        "bom",
        "csv-quoted",
        "messages",
        "implicit-prompt-pairs",
        "yaml-merge-override",
    ],
)
def test_edge_values_still_plan(build, tmp_path, tiny_llama, capsys):
    rc, text = plan(build(tmp_path, tiny_llama), capsys)
    assert rc == 0, text


def test_few_unusable_rows_are_a_warning(tmp_path, tiny_llama, capsys):
    rc, text = plan(data("train.jsonl", with_nulls(2))(tmp_path, tiny_llama), capsys)
    assert rc == 0, text
    assert "2 of 48 rows are unusable and will be dropped" in text and "train.jsonl lines 47, 48" in text


def test_full_file_checks_are_cached_by_content(tmp_path, tiny_llama, capsys, monkeypatch):
    path = recipe()(tmp_path, tiny_llama)
    assert plan(path, capsys)[0] == 0
    assert list((tmp_path / "cache" / "datacheck").glob("*.json"))

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("the files were read again")

    monkeypatch.setattr(align_data, "_scan_files", boom)
    assert plan(path, capsys)[0] == 0  # same content: the cached result
    write_jsonl(tmp_path / "train.jsonl", alpaca_rows(47))  # new content: read again
    with pytest.raises(AssertionError, match="read again"):
        plan(path, capsys)


# ---------------------------------------------------------------- the run side of the same rules


def test_implicit_prompt_message_pairs_are_preference_not_hh():
    row = {"chosen": [MSG[0], MSG[1]], "rejected": [MSG[0], {**MSG[1], "content": "6."}]}
    fmt, problems = check_format([row], DatasetSpec(path="x.jsonl"), ("preference", "hh_rlhf"), "d")
    assert (fmt, problems) == ("preference", [])
    assert preference_row(row, fmt, chat=True) == {
        "prompt": [MSG[0]],
        "chosen": [MSG[1]],
        "rejected": row["rejected"][1:],
    }


def test_unusable_rows_are_dropped_before_training():
    import datasets

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "a"}]
    rows.append({"prompt": "p", "chosen": "", "rejected": "b"})
    assert [row_issue(r, "preference") for r in rows] == [None, "chosen == rejected", "empty `chosen`"]
    out = to_preference(datasets.Dataset.from_list(rows), "preference", chat=False)
    assert out["rejected"] == ["b"]


# ---------------------------------------------------------------- through a real process, as a user runs it


def test_good_recipe_plans_in_a_subprocess(tmp_path, tiny_llama):
    r = align("plan", str(recipe()(tmp_path, tiny_llama)))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "case,named",
    [
        ("jsonl-corrupt-line-21", "train.jsonl line 21"),
        ("max-steps-minus-5", "stages[0](sft).train.max_steps"),
        ("duplicate-train-key", "duplicate key `max_steps`"),
        ("not-utf8", "not UTF-8"),
        ("trust-remote-code-yes", "model.trust_remote_code"),
    ],
)
def test_refused_in_a_subprocess(case, named, tmp_path, tiny_llama):
    build = {**RECIPE_CASES, **DATA_CASES}[case][0]
    r = align("plan", str(build(tmp_path, tiny_llama)))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert named in r.stderr, r.stderr
