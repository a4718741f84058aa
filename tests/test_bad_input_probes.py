"""More malformed inputs, each one an ML engineer's real mistake: `align plan`, `eval`, `compare`, `score`, `push`,
`merge` and `report` refuse each with exit 2, no traceback, and the field or file named (issue 12).

Every case runs the CLI's `main()` in this process, on the tiny llama and the two-stage SFT recipe of conftest, with
one fault per case; a few good inputs next to them must still plan.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import alpaca_rows, sft_recipe, write_jsonl, write_recipe

from align.cli import main

Build = Callable[[Path, Path], list[str]]  # (tmp, tiny model) -> argv

pytestmark = pytest.mark.usefixtures("own_cache")
S = "stages[0](sft)"


# ---------------------------------------------------------------- recipe builders (align plan)


def recipe(change: Callable[[dict, Path], Any] | None = None, *, with_stage: str | None = None) -> Build:
    """`align plan` of conftest's SFT recipe, with a dpo / grpo / ppo stage inserted second when asked, changed
    in place by `change(recipe, tmp)`."""

    def build(tmp: Path, model: Path) -> list[str]:
        r = sft_recipe(tmp, model)
        if with_stage == "dpo":
            pairs = [{"prompt": f"Add {i} and 7.", "chosen": f"{i + 7}.", "rejected": "Apple."} for i in range(20)]
            write_jsonl(tmp / "pairs.jsonl", pairs)
            r["datasets"]["pairs"] = {"path": str(tmp / "pairs.jsonl")}
            r["stages"].insert(1, {"name": "dpo", "type": "dpo", "from": "sft", "data": "pairs", "train": {}})
        elif with_stage in ("grpo", "ppo"):
            write_jsonl(tmp / "prompts.jsonl", [{"prompt": f"Add {i} and 2."} for i in range(8)])
            (tmp / "rw.py").write_text("def score(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
            r["datasets"]["prompts"] = {"path": str(tmp / "prompts.jsonl")}
            train = {"max_steps": 2}
            if with_stage == "grpo":
                train.update(per_device_train_batch_size=4, num_generations=2)
            stage = {"name": with_stage, "type": with_stage, "from": "sft", "data": "prompts", "reward": "rw:score"}
            r["stages"].insert(1, {**stage, "train": train})
        if change is not None:
            change(r, tmp)
        return ["plan", str(write_recipe(tmp, r))]

    return build


def train(**kw: Any) -> Build:
    return recipe(lambda r, t: r["stages"][0]["train"].update(kw))


def second_train(stage: str, **kw: Any) -> Build:
    return recipe(lambda r, t: r["stages"][1]["train"].update(kw), with_stage=stage)


def stage(i: int, **kw: Any) -> Build:
    return recipe(lambda r, t: r["stages"][i].update(kw))


def dataset(**kw: Any) -> Build:
    return recipe(lambda r, t: r["datasets"]["train"].update(kw))


def override(*ovs: str) -> Build:
    return lambda tmp, model: [*recipe()(tmp, model), *ovs]


def model_folder(edit: Callable[[Path], Any]) -> Build:
    """The recipe's model: a copy of the tiny llama, edited by `edit(folder)`."""

    def change(r: dict, tmp: Path) -> None:
        shutil.copytree(r["model"], tmp / "m")
        edit(tmp / "m")
        r["model"] = str(tmp / "m")

    return recipe(change)


def chat_template(body: str | None, *, folder: bool = False) -> Build:
    def change(r: dict, tmp: Path) -> None:
        p = tmp / "tpl.jinja"
        if folder:
            p.mkdir()
        elif body is not None:
            p.write_text(body)
        r["model"] = {"name_or_path": r["model"], "chat_template": str(p)}

    return recipe(change)


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def dangling(r: dict, tmp: Path) -> None:
    (tmp / "dangling.jsonl").symlink_to(tmp / "gone.jsonl")
    r["datasets"]["train"]["path"] = str(tmp / "dangling.jsonl")


def extends_loop(r: dict, tmp: Path) -> None:
    write(tmp / "a.yaml", "extends: b.yaml\n")
    write(tmp / "b.yaml", "extends: a.yaml\n")
    r["extends"] = "a.yaml"


# ---------------------------------------------------------------- CLI builders (eval, compare, score, push, ...)

MMLU_ROW = "What is 1+1?,1,2,3,4,B\n"


def gen_task(tmp: Path, rows: list[str] | None = None, metric: str = "{name: chrf}") -> Path:
    good = json.dumps({"src": "Hallo", "refs": ["Hello"]})
    data = write(tmp / "items.jsonl", "".join(f"{r}\n" for r in (rows if rows is not None else [good, good])))
    return write(
        tmp / "gen_toy.yaml",
        f"name: gen_toy\ntype: generation\ndata: {{path: {data}, format: jsonl, input_field: src, "
        f"reference_field: refs}}\nprompt: {{template: 'Translate: {{src}}'}}\nmetric: {metric}\n",
    )


def mmlu_task(tmp: Path) -> Path:
    root = tmp / "mmlu"
    for part in ("test", "dev"):
        (root / part).mkdir(parents=True, exist_ok=True)
        write(root / part / f"algebra_{part}.csv", MMLU_ROW * 3)
    return write(
        tmp / "mmlu_toy.yaml",
        f"name: mmlu_toy\ntype: mmlu\ndata: {{path: {root}, format: mmlu_csv, subjects: [algebra]}}\n"
        "mmlu: {num_fewshot: 1}\n",
    )


def eval_gen(rows: list[str], *extra: str) -> Build:
    return lambda tmp, m: ["eval", str(m), "--tasks", str(gen_task(tmp, rows)), "--out", str(tmp / "out"), *extra]


def eval_target(make: Callable[[Path, Path], Path]) -> Build:
    return lambda tmp, m: ["eval", str(make(tmp, m)), "--tasks", str(mmlu_task(tmp)), "--out", str(tmp / "out")]


def run_folder(tmp: Path, run_json: str | None = '{"stages": []}', stage_json: str | None = None) -> Path:
    run = tmp / "runs" / "x"
    (run / "sft").mkdir(parents=True)
    if run_json is not None:
        write(run / "run.json", run_json)
    if stage_json is not None:
        write(run / "sft" / "stage.json", stage_json)
    return run


def adapter(tmp: Path, config: str) -> Path:
    folder = tmp / "adapter"
    folder.mkdir()
    write(folder / "adapter_config.json", config)
    write(folder / "adapter_model.safetensors", b"")
    return folder


def metrics(**kw: Any) -> dict:
    rec = {"target": "sft", "task": "mmlu", "task_version": 1, "metric": "accuracy", "value": 50.0, **kw}
    return {"schema": "align.metrics/1", "results": [rec]}


def compare(baseline: dict) -> Build:
    def build(tmp: Path, m: Path) -> list[str]:
        cur = write(tmp / "cur.json", json.dumps(metrics()))
        return ["compare", str(cur), "--baseline", str(write(tmp / "base.json", json.dumps(baseline)))]

    return build


def score_into(out: Callable[[Path], Path]) -> Build:
    def build(tmp: Path, m: Path) -> list[str]:
        preds = write(tmp / "p.jsonl", '{"prediction": "a"}\n{"prediction": "b"}\n')
        return ["score", str(gen_task(tmp)), "--predictions", str(preds), "--out", str(out(tmp))]

    return build


GOOD_ROWS = "".join(json.dumps(r) + "\n" for r in alpaca_rows())

# ---------------------------------------------------------------- the cases: (id, argv builder, must appear)

CASES: list[tuple[str, Build, list[str]]] = [
    # trainer values TRL takes without a word, or rejects only when the stage starts
    ("lr-scheduler-typo", train(lr_scheduler_type="cosinee"), [f"{S}.train.lr_scheduler_type", "`cosine`"]),
    ("optim-typo", train(optim="adamw_torchh"), [f"{S}.train.optim", "did you mean `adamw_torch`"]),
    ("eval-strategy-typo", train(eval_strategy="stepz"), [f"{S}.train.eval_strategy", "`steps`"]),
    ("max-grad-norm-negative", train(max_grad_norm=-1), [f"{S}.train.max_grad_norm", "0 or more"]),
    ("adam-beta1-1.5", train(adam_beta1=1.5), [f"{S}.train.adam_beta1", "below 1"]),
    ("adam-epsilon-negative", train(adam_epsilon=-1e-8), [f"{S}.train.adam_epsilon"]),
    ("max-steps-float", train(max_steps=6.5), [f"{S}.train.max_steps", "int"]),
    ("accumulation-float", train(gradient_accumulation_steps=2.5), [f"{S}.train.gradient_accumulation_steps"]),
    ("train-is-a-list", stage(0, train=[{"max_steps": 5}]), [f"{S}.train"]),
    ("dpo-beta-negative", second_train("dpo", beta=-0.1), ["stages[1](dpo).train.beta", "greater than 0"]),
    ("dpo-beta-zero", second_train("dpo", beta=0), ["stages[1](dpo).train.beta"]),
    ("dpo-label-smoothing-0.7", second_train("dpo", label_smoothing=0.7), ["stages[1](dpo).train.label_smoothing"]),
    ("grpo-one-generation", second_train("grpo", num_generations=1), ["stages[1](grpo).train.num_generations"]),
    ("grpo-zero-generations", second_train("grpo", num_generations=0), ["stages[1](grpo).train.num_generations"]),
    ("grpo-generations-not-dividing", second_train("grpo", num_generations=3), ["stages[1](grpo).train"]),
    ("grpo-temperature-zero", second_train("grpo", temperature=0.0), ["stages[1](grpo).train.temperature"]),
    ("grpo-beta-negative", second_train("grpo", beta=-0.5), ["stages[1](grpo).train.beta"]),
    (
        "grpo-reward-folder-missing",
        recipe(lambda r, t: r["stages"][1].update(reward="./no-rm"), with_stage="grpo"),
        ["stages[1](grpo).reward", "no-rm", "does not exist"],
    ),
    ("ppo-gamma-1.5", second_train("ppo", gamma=1.5), ["stages[1](ppo).train.gamma", "[0, 1]"]),
    ("ppo-cliprange-zero", second_train("ppo", cliprange=0), ["stages[1](ppo).train.cliprange"]),
    ("ppo-kl-negative", second_train("ppo", kl_coef=-0.1), ["stages[1](ppo).train.kl_coef"]),
    ("ppo-epochs-zero", second_train("ppo", ppo_epochs=0), ["stages[1](ppo).train.ppo_epochs"]),
    ("ppo-top-p-2", second_train("ppo", top_p=2.0), ["stages[1](ppo).train.top_p"]),
    (
        "ppo-batch-not-multiple",
        second_train("ppo", batch_size=6, mini_batch_size=4),
        ["stages[1](ppo).train.batch_size", "multiple"],
    ),
    # adapter
    ("lora-dropout-1.5", recipe(lambda r, t: r["stages"][0]["adapter"].update(dropout=1.5)), [f"{S}.adapter.dropout"]),
    ("lora-alpha-zero", recipe(lambda r, t: r["stages"][0]["adapter"].update(alpha=0)), [f"{S}.adapter.alpha"]),
    ("lora-r-float", recipe(lambda r, t: r["stages"][0]["adapter"].update(r=4.5)), [f"{S}.adapter.r"]),
    (
        "lora-target-typo",
        recipe(lambda r, t: r["stages"][0]["adapter"].update(target_modules=["q_projj"])),
        [f"{S}.adapter.target_modules", "q_projj", "did you mean `q_proj`"],
    ),
    (
        "lora-targets-empty",
        recipe(lambda r, t: r["stages"][0]["adapter"].update(target_modules=[])),
        [f"{S}.adapter.target_modules", "empty"],
    ),
    # stage graph and shapes
    ("from-a-later-stage", stage(0, **{"from": "ppl"}), [f"{S}.from", "not an earlier stage"]),
    ("from-itself", stage(0, **{"from": "sft"}), [f"{S}.from"]),
    ("duplicate-stage-name", stage(1, name="sft"), ["stages[1](sft).name", "twice"]),
    ("eval-tasks-missing", recipe(lambda r, t: r["stages"][1].pop("tasks")), ["stages[1](ppl).tasks"]),
    ("eval-tasks-empty", stage(1, tasks=[]), ["stages[1](ppl).tasks"]),
    ("eval-targets-unknown", stage(1, targets=["base", "sfft"]), ["stages[1](ppl).targets"]),
    ("stages-empty", recipe(lambda r, t: r.update(stages=[])), ["stages"]),
    ("data-empty-list", stage(0, data=[]), [f"{S}.data", "names no dataset"]),
    (
        "dataset-path-empty",
        recipe(lambda r, t: r["datasets"][next(iter(r["datasets"]))].update(path="")),
        [".path", "at least 1 character"],
    ),
    ("data-empty-mapping", stage(0, data={}), [f"{S}.data", "names no dataset"]),
    ("data-a-number", stage(0, data=5), [f"{S}.data: must be a name (string) or a list of names", "(got 5)"]),
    ("model-empty-mapping", recipe(lambda r, t: r.update(model={})), ["model.name_or_path"]),
    (
        "output-dir-is-a-file",
        recipe(lambda r, t: r.update(output_dir=str(write(t / "f", "x")))),
        ["output_dir", "is a file"],
    ),
    # extends and overrides
    ("extends-loop", recipe(extends_loop), ["extends", "loops"]),
    ("extends-missing", recipe(lambda r, t: r.update(extends="nope.yaml")), ["extends", "nope.yaml"]),
    ("extends-a-folder", recipe(lambda r, t: (t / "pd").mkdir() or r.update(extends="pd")), ["extends"]),
    ("override-empty-key", override("=1"), ["override", "empty key"]),
    ("override-empty-part", override("stages..sft=1"), ["override", "empty"]),
    ("override-empty-value", override("stages.sft.train.max_steps="), [f"{S}.train.max_steps"]),
    ("override-index-out-of-range", override("stages.5.train.max_steps=1"), ["override stages.5"]),
    ("override-unknown-stage", override("stages.sfft.train.max_steps=1"), ["sfft", "did you mean `sft`"]),
    # datasets
    (
        "csv-header-only",
        recipe(lambda r, t: r["datasets"]["train"].update(path=str(write(t / "t.csv", "a,b\n")))),
        ["t.csv"],
    ),
    (
        "parquet-zero-bytes",
        recipe(lambda r, t: r["datasets"]["train"].update(path=str(write(t / "t.parquet", b"")))),
        ["t.parquet"],
    ),
    ("symlink-to-nothing", recipe(dangling), ["dangling.jsonl"]),
    ("eval-fraction-one", dataset(eval_fraction=1), ["datasets.train.eval_fraction"]),
    ("eval-fraction-0.99", dataset(eval_fraction=0.99), ["datasets.train.eval_fraction", "none to train on"]),
    (
        "columns-missing-column",
        dataset(columns={"question": "instruction"}),
        ["datasets.train.columns.question", "not a column"],
    ),
    ("columns-a-list", dataset(columns=["instruction"]), ["datasets.train.columns"]),
    ("split-of-a-local-file", dataset(split="validation"), ["datasets.train.split", "eval_path"]),
    ("subset-of-a-local-file", dataset(subset="de"), ["datasets.train.subset"]),
    # the model folder
    (
        "model-type-unknown",
        model_folder(lambda m: write(m / "config.json", '{"model_type": "llamax", "hidden_size": 32}')),
        ["model", "config.json", "llamax", "did you mean `llama`"],
    ),
    (
        "model-config-field-type",
        model_folder(lambda m: write(m / "config.json", '{"model_type": "llama", "hidden_size": "big"}')),
        ["model", "config.json", "hidden_size"],
    ),
    (
        "model-weights-garbage",
        model_folder(lambda m: write(m / "model.safetensors", b"garbage")),
        ["model.safetensors"],
    ),
    ("model-weights-empty", model_folder(lambda m: write(m / "model.safetensors", b"")), ["model.safetensors"]),
    (
        "model-tokenizer-json-broken",
        model_folder(lambda m: write(m / "tokenizer.json", "{")),
        ["model", "tokenizer.json"],
    ),
    (
        "model-broken-adapter-config",
        model_folder(lambda m: write(m / "adapter_config.json", "{oops")),
        ["model", "adapter_config.json", "not valid JSON"],
    ),
    (
        "model-is-an-adapter",
        lambda tmp, m: ["plan", str(write_recipe(tmp, sft_recipe(tmp, adapter(tmp, '{"peft_type": "LORA"}'))))],
        ["model", "adapter", "align merge"],
    ),
    ("chat-template-missing", chat_template(None), ["model.chat_template", "does not exist"]),
    ("chat-template-a-folder", chat_template(None, folder=True), ["model.chat_template", "not a file"]),
    ("chat-template-empty", chat_template(""), ["model.chat_template", "empty"]),
    (
        "chat-template-bad-jinja",
        chat_template("{% for m in messages %}{{ m.content }"),
        ["model.chat_template", "Jinja"],
    ),
    # align eval
    ("eval-task-data-empty", eval_gen([]), ["items.jsonl", "no records"]),
    (
        "eval-task-input-null",
        eval_gen([json.dumps({"src": None, "refs": ["x"]})]),
        ["items.jsonl:1", "'src'", "non-empty string"],
    ),
    (
        "eval-task-unknown-metric",
        lambda t, m: ["eval", str(m), "--tasks", str(gen_task(t, metric="{name: bleuu}"))],
        ["gen_toy.yaml", "bleuu"],
    ),
    (
        "eval-out-under-a-file",
        lambda t, m: ["eval", str(m), "--tasks", str(mmlu_task(t)), "--out", str(write(t / "f", "x") / "sub")],
        ["--out", "which is a file"],
    ),
    (
        "eval-target-broken-stage-json",
        eval_target(lambda t, m: run_folder(t, stage_json="{oops") / "sft"),
        ["TARGET", "stage.json"],
    ),
    (
        "eval-target-adapter-without-base",
        eval_target(lambda t, m: adapter(t, '{"peft_type": "LORA", "r": 4}')),
        ["TARGET", "base_model_name_or_path"],
    ),
    # align compare
    ("compare-task-version-string", compare(metrics(task_version="one")), ["base.json", "results[0].task_version"]),
    ("compare-n-negative", compare(metrics(n=-5)), ["base.json", "results[0].n"]),
    # align score
    ("score-out-is-a-file", score_into(lambda t: write(t / "of", "x")), ["--out", "is a file"]),
    # align push, merge, report
    (
        "push-run-json-broken",
        lambda t, m: ["push", str(run_folder(t, "{oops")), "--repo-id", "a/b"],
        ["run.json", "not valid JSON"],
    ),
    (
        "push-run-json-a-list",
        lambda t, m: ["push", str(run_folder(t, "[1]")), "--repo-id", "a/b"],
        ["run.json", "JSON object"],
    ),
    (
        "push-stage-json-broken",
        lambda t, m: [
            "push",
            str(run_folder(t, stage_json="{oops") / "sft"),
            "--repo-id",
            "a/b",
            "--base-model",
            "a/b",
        ],
        ["stage.json", "not valid JSON"],
    ),
    (
        "push-stage-repo-id-with-a-space",
        recipe(lambda r, t: r["stages"].append({"name": "ship", "type": "push", "from": "sft", "repo_id": "a b/c"})),
        ["stages[2](ship).repo_id", "not a valid hub repository id"],
    ),
    (
        "push-repo-id-with-a-space",
        lambda t, m: ["push", str(run_folder(t, "{}")), "--repo-id", "my org/model"],
        ["--repo-id", "not a valid hub repository id"],
    ),
    (
        "push-repo-id-dot-git",
        lambda t, m: ["push", str(run_folder(t, "{}")), "--repo-id", "org/model.git"],
        ["--repo-id", "cannot end by '.git'"],
    ),
    (
        "push-repo-id-no-org",
        lambda t, m: ["push", str(run_folder(t, "{}")), "--repo-id", "not a repo"],
        ["--repo-id", "is not ORG/NAME"],
    ),
    (
        "merge-out-is-a-file",
        lambda t, m: ["merge", str(adapter(t, "{}")), "--out", str(write(t / "of", "x"))],
        ["--out"],
    ),
    ("report-missing-folder", lambda t, m: ["report", str(t / "nope")], ["RUN_DIR", "nope"]),
    ("plan-gpu-memory-zero", lambda t, m: [*recipe()(t, m), "--gpu-memory", "0GB"], ["--gpu-memory", "more than 0"]),
]


@pytest.mark.parametrize(("build", "want"), [pytest.param(b, w, id=i) for i, b, w in CASES])
def test_bad_input_is_refused(build: Build, want: list[str], tmp_path, tiny_llama, capsys) -> None:
    argv = build(tmp_path, tiny_llama)
    rc = main(argv)
    cap = capsys.readouterr()
    out = cap.out + cap.err
    assert rc == 2, out
    assert "Traceback" not in out, out
    for w in want:
        assert w in out, f"{w!r} not in:\n{out}"
    assert not (tmp_path / "out" / "metrics.json").exists()  # nothing was evaluated
    assert not (tmp_path / "runs" / "tiny").exists()  # nothing was written for the run


@pytest.mark.parametrize(
    "build",
    [
        train(lr_scheduler_type="cosine", optim="adamw_torch", max_grad_norm=0, adam_beta2=0.98),
        second_train("dpo", beta=0.05, label_smoothing=0.1),
        second_train("grpo", beta=0.0, temperature=0.7),
        recipe(lambda r, t: r["stages"][0]["adapter"].update(target_modules=["q_proj", "v_proj"])),
        dataset(eval_fraction=0.001),  # 1 row of 48 held out: still rows on both sides
        chat_template("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"),
        override("stages.0.train.max_steps=3"),
    ],
    ids=["trainer-values", "dpo-values", "grpo-values", "lora-targets", "tiny-eval-share", "template", "override"],
)
def test_good_values_still_plan(build: Build, tmp_path, tiny_llama, capsys) -> None:
    rc = main(build(tmp_path, tiny_llama))
    cap = capsys.readouterr()
    assert rc == 0, cap.out + cap.err


def test_a_refused_run_leaves_a_finished_run_folder_untouched(tmp_path, tiny_llama, capsys) -> None:
    """`align run` with a bad override: exit 2 before the run folder is opened; what is there stays as it was."""
    path = write_recipe(tmp_path, sft_recipe(tmp_path, tiny_llama))
    done = tmp_path / "runs" / "tiny" / "sft"
    done.mkdir(parents=True)
    write(done / "stage.json", '{"fingerprint": "x"}')
    before = {p: p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    rc = main(["run", str(path), "stages.sft.adapter.target_modules=[q_projj]"])
    out = capsys.readouterr().err
    assert rc == 2 and f"{S}.adapter.target_modules" in out, out
    after = {p: p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    assert after == before
