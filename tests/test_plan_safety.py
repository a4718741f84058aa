"""Plan-time refusals that protect the user: no code runs that the recipe did not name, no secret lands in a run
folder, and values TRL would reject only at train time (a misspelled loss type) are refused before any stage."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import plan_in_process, sft_recipe, write_jsonl, write_recipe

from align.cli import main

pytestmark = pytest.mark.usefixtures("own_cache")
plan = plan_in_process


def grpo_recipe(tmp: Path, model: Path, reward: str) -> Path:
    r = sft_recipe(tmp, model)
    write_jsonl(tmp / "prompts.jsonl", [{"prompt": f"Add {i} and 2."} for i in range(8)])
    r["datasets"]["prompts"] = {"path": str(tmp / "prompts.jsonl")}
    r["stages"].insert(
        1,
        {
            "name": "grpo",
            "type": "grpo",
            "from": "sft",
            "data": "prompts",
            "reward": reward,
            "train": {"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 2},
        },
    )
    return write_recipe(tmp, r)


def evil_package(tmp: Path) -> Path:
    """A package whose __init__ leaves a mark when executed; its submodule defines the reward."""
    pkg = tmp / "evilpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"open({str(tmp / 'RAN')!r}, 'w').write('executed')\n")
    (pkg / "sub.py").write_text("def score(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    return tmp / "RAN"


def test_plan_finds_a_reward_function_without_running_its_package(tmp_path, tiny_llama, capsys):
    mark = evil_package(tmp_path)
    rc, out = plan(grpo_recipe(tmp_path, tiny_llama, "evilpkg.sub:score"), capsys)
    assert rc == 0, out
    assert not mark.exists(), "align plan executed evilpkg/__init__.py"


def test_a_missing_reward_function_is_refused_at_plan_time(tmp_path, tiny_llama, capsys):
    evil_package(tmp_path)
    rc, out = plan(grpo_recipe(tmp_path, tiny_llama, "evilpkg.sub:scores"), capsys)
    assert rc == 2 and "stages[1](grpo).reward" in out and "no top-level function `scores`" in out, out
    rc, out = plan(grpo_recipe(tmp_path / "x", tiny_llama, "nosuchmodule:score"), capsys)
    assert rc == 2 and "module `nosuchmodule` not found" in out, out


def test_a_token_in_the_recipe_is_refused_and_not_echoed(tmp_path, tiny_llama, capsys):
    token = "hf_abcdefghijklmnopqrstuvwxyz0123456789"
    r = sft_recipe(tmp_path, tiny_llama)
    r["stages"][0]["train"]["hub_token"] = token
    rc, out = plan(write_recipe(tmp_path, r), capsys)
    assert rc == 2 and "stages[0](sft).train.hub_token" in out and "HF_TOKEN" in out, out
    assert token not in out
    rc = main(
        [
            "plan",
            str(write_recipe(tmp_path, sft_recipe(tmp_path, tiny_llama), "ok.yaml")),
            f"stages.sft.train.hub_token={token}",
        ]
    )
    out = capsys.readouterr().err
    assert rc == 2 and token not in out and "HF_TOKEN" in out
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("push_to_hub", True, "type: push"),
        ("hub_model_id", "me/x", "align push"),
        ("loss_type", "nlll", "did you mean `nll`"),
    ],
)
def test_sft_train_fields_refused_with_the_fix(tmp_path, tiny_llama, capsys, key, value, named):
    r = sft_recipe(tmp_path, tiny_llama)
    r["stages"][0]["train"][key] = value
    rc, out = plan(write_recipe(tmp_path, r), capsys)
    assert rc == 2 and f"train.{key}" in out and named in out, out


@pytest.mark.parametrize(
    "loss_type, ok",
    [(["sigmoidd"], False), ("hingee", False), (["sigmoid", "sft"], True), ("ipo", True)],
)
def test_dpo_loss_types_are_checked_against_trls_list(tmp_path, tiny_llama, capsys, loss_type, ok):
    r = sft_recipe(tmp_path, tiny_llama)
    write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": f"Q{i}?", "chosen": f"yes {i}", "rejected": "no"} for i in range(8)]
    )
    r["datasets"]["pairs"] = {"path": str(tmp_path / "pairs.jsonl")}
    r["stages"].insert(
        1, {"name": "dpo", "type": "dpo", "from": "sft", "data": "pairs", "train": {"loss_type": loss_type}}
    )
    rc, out = plan(write_recipe(tmp_path, r), capsys)
    if ok:
        assert rc == 0, out
    else:
        assert rc == 2 and "stages[1](dpo).train.loss_type" in out and "did you mean" in out, out


def test_report_to_a_tracker_that_is_not_installed_is_refused(tmp_path, tiny_llama, capsys):
    from align.tracking import PACKAGES, installed

    absent = next(n for n in sorted(PACKAGES) if n not in installed())  # 13 trackers: one is always missing here
    r = sft_recipe(tmp_path, tiny_llama)
    r["stages"][0]["train"]["report_to"] = [absent]
    rc, out = plan(write_recipe(tmp_path, r), capsys)
    assert rc == 2 and "train.report_to" in out and f"pip install {PACKAGES[absent]}" in out, out


def chat_pairs(n: int = 8) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"Add {i} and 2."}],
            "chosen": [{"role": "assistant", "content": f"{i + 2}"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("stage_type", ["dpo", "reward", "eval"])
def test_chat_data_without_a_chat_template_is_refused_at_plan_time(tmp_path, tiny_gpt2, capsys, stage_type):
    """The tokenizer of tiny_gpt2 has no chat template: message rows could not become token ids mid-run."""
    r = sft_recipe(tmp_path, tiny_gpt2)
    write_jsonl(tmp_path / "pairs.jsonl", chat_pairs())
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": p["prompt"] + p["chosen"]} for p in chat_pairs()])
    r["datasets"]["pairs"] = {"path": str(tmp_path / "pairs.jsonl")}
    r["datasets"]["chat"] = {"path": str(tmp_path / "chat.jsonl")}
    if stage_type == "eval":
        r["stages"][1]["tasks"].append({"type": "perplexity", "data": "chat"})
        field = "stages[1](ppl).tasks[1].data"
    else:
        r["stages"].insert(1, {"name": "pref", "type": stage_type, "from": "sft", "data": "pairs"})
        if stage_type == "reward":
            r["stages"][1].pop("from")
        field = "stages[1](pref).data"
    rc, out = plan(write_recipe(tmp_path, r), capsys)
    assert rc == 2 and field in out and "no chat template" in out and "model.chat_template" in out, out
    # with a template named in the recipe, the same recipe plans
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    r["model"] = {"name_or_path": str(tiny_gpt2), "chat_template": str(tmp_path / "t.jinja")}
    rc, out = plan(write_recipe(tmp_path, r), capsys)
    assert rc == 0, out


@pytest.mark.parametrize("value", ["yes", 1, "true"])
def test_stage_booleans_are_strict(tmp_path, tiny_llama, capsys, value):
    r = sft_recipe(tmp_path, tiny_llama)
    r["stages"][0]["merge"] = value
    rc, out = plan(write_recipe(tmp_path, r), capsys)
    assert rc == 2 and "stages[0](sft).merge" in out and "boolean" in out, out
