"""Task YAML schema: shipped task files load, typos and wrong sections fail naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from align.evaluation.tasks import TaskSpecError, load_generation_items, load_task

TASKS = Path(__file__).resolve().parents[1] / "evaluation" / "tasks"

GEN = """
name: toy_mt
type: generation
data: {path: data.jsonl, format: jsonl, input_field: src, reference_field: refs}
prompt: {template: "Translate: {src}\\nEnglish:"}
metric: {name: bleu}
limit: 2
"""


@pytest.mark.parametrize("name", ["mmlu_shared5", "wmt22_de_en", "dialogsum"])
def test_shipped_tasks_load(name: str) -> None:
    spec = load_task(name, tasks_dir=TASKS)
    assert spec.name == name
    assert spec == load_task(TASKS / f"{name}.yaml")
    if spec.type == "mmlu":
        assert spec.mmlu.num_fewshot == 5 and len(spec.data.subjects) == 5
        assert spec.metric.name == "accuracy"


def test_typo_key_rejected_naming_it(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(GEN.replace("input_field", "imput_field"))
    with pytest.raises(TaskSpecError, match="imput_field") as e:
        load_task(bad)
    assert "bad.yaml" in str(e.value) and "data.imput_field: unknown key (did you mean `input_field`?)" in str(e.value)
    assert "\n" not in str(e.value)  # one line, no pydantic dump
    bad.write_text(GEN + "limt: 3\n")
    with pytest.raises(TaskSpecError, match="limt: unknown key .did you mean `limit`"):
        load_task(bad)
    bad.write_text(GEN + "max_new_tokens: 8\n")  # valid, but under `generation:`
    with pytest.raises(TaskSpecError, match="max_new_tokens: unknown key .it goes under `generation:`"):
        load_task(bad)
    bad.write_text(GEN.replace("{name: bleu}", "{name: bleu, rouge_types: [rouge1]}"))
    with pytest.raises(TaskSpecError, match="rouge_types"):
        load_task(bad)


def test_type_specific_rules(tmp_path) -> None:
    bad = tmp_path / "t.yaml"
    bad.write_text(GEN.replace("metric: {name: bleu}", "metric: {name: accuracy}"))
    with pytest.raises(TaskSpecError, match="metric.name must be one of"):
        load_task(bad)
    bad.write_text(GEN + "mmlu: {num_fewshot: 5}\n")
    with pytest.raises(TaskSpecError, match="only valid for type mmlu"):
        load_task(bad)
    with pytest.raises(FileNotFoundError, match="no task named 'nope'"):
        load_task("nope", tasks_dir=tmp_path)


def test_generation_items_and_limit(tmp_path) -> None:
    (tmp_path / "t.yaml").write_text(GEN)
    rows = [
        {"src": "Hallo", "refs": {"A": "Hello", "B": "Hi"}},
        {"src": "Welt", "refs": ["World"]},
        {"src": "x", "refs": "y"},
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = load_task(tmp_path / "t.yaml")
    prompts, refs = load_generation_items(spec, root=tmp_path)
    assert prompts == ["Translate: Hallo\nEnglish:", "Translate: Welt\nEnglish:"]
    assert refs == [["Hello", "Hi"], ["World"]]
