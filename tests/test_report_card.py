"""report.md and model cards from one real tiny run (SFT with merge -> reward -> DPO -> PPO -> eval): every number
they print equals the run's files, the card's metadata parses back, and no local path or token leaks into it."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from align.card import build_card
from align.errors import AlignError
from align.report import plots, read_run, results_table, stage_chain, write_report

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
FAKE_TOKEN = "hf_" + "Ab3" * 12
ABS_PATH = re.compile(r"(?<![\w.:/~>-])(?:~|[A-Za-z]:)?/(?:[\w.+-]+/)*[\w.+-]+")


@pytest.fixture(scope="module")
def run(rl_chain) -> Path:
    """The shared real run (conftest.rl_chain); the tests that edit it work on copies."""
    return rl_chain[0] / "runs" / "chain"


def copy_run(run: Path, dest: Path) -> Path:
    """The run's whole project folder (base model, data, runs/) copied, so relative records still resolve."""
    shutil.copytree(run.parent.parent, dest, ignore=shutil.ignore_patterns(".partial", "*.lock"))
    return dest / "runs" / run.name


def table_after(md: str, heading: str) -> list[dict[str, str]]:
    """The first markdown table under `heading`, as rows keyed by the header's cells."""
    lines = (md.split(heading, 1)[1] if heading else md).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    header, body = rows[0], rows[2:]
    return [dict(zip(header, r, strict=True)) for r in body]


def number(cell: str) -> float:
    return float(cell.split("±")[0].strip())


def results(run: Path) -> list[dict]:
    return json.loads((run / "eval" / "metrics.json").read_text())["results"]


def assert_table_equals_metrics(md: str, heading: str, run: Path) -> None:
    rows = table_after(md, heading)
    got = {
        (row["task / metric"].rsplit(" ", 1)[0], t.strip("`")): number(v)
        for row in rows
        for t, v in row.items()
        if t.startswith("`") and v != "-"  # the target columns
    }
    assert results(run)
    for r in results(run):
        value = got[(f"{r['task']} / {r['metric']}", r["target"])]
        assert math.isclose(value, r["value"], rel_tol=1e-3, abs_tol=1e-4), (r, value)


# ---------------------------------------------------------------- report


def test_report_and_plots_are_written(run) -> None:
    path = write_report(run)
    assert path == run / "report.md" and path.stat().st_size > 0
    names = {p.name for p in (run / "report").glob("*.png")}
    assert names == {"loss.png", "rl.png", "reward_accuracy.png", "eval_eval.png"}
    for p in (run / "report").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 1000
    md = path.read_text()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (run / link).is_file(), link  # links relative to the run folder
    assert str(run.parent.parent) not in md  # the report can be moved with the run


def test_report_eval_numbers_equal_metrics_json(run) -> None:
    md = write_report(run).read_text()
    assert_table_equals_metrics(md, "## Evaluation", run)
    assert_table_equals_metrics(results_table(run), "", run)
    # the change column: the last stage against base, both from metrics.json
    by = {r["target"]: r["value"] for r in results(run)}
    change = table_after(md, "## Evaluation")[0]["change (ppo vs base)"]
    assert math.isclose(float(change.split(" ")[0]), by["ppo"] - by["base"], rel_tol=1e-3)


def test_stage_chain_numbers_equal_stage_json(run) -> None:
    rows = {r["stage"].strip("`"): r for r in table_after(stage_chain(run), "")}
    assert list(rows) == ["sft", "rm", "dpo", "ppo", "eval"]
    assert rows["ppo"]["input"] == "dpo, rm" and rows["eval"]["input"] == "targets: base, sft, dpo, ppo"
    for name in ("sft", "rm", "dpo", "ppo"):
        m = json.loads((run / name / "stage.json").read_text())["metrics"]
        assert int(rows[name]["steps"]) == m["steps"]
        assert int(rows[name]["trainable params"]) == m["trainable_params"]
        assert int(rows[name]["world size"]) == m["world_size"]
        runtime = m.get("train_runtime_s", m.get("seconds"))
        assert math.isclose(float(rows[name]["runtime (s)"]), runtime, rel_tol=1e-3)
    md = write_report(run).read_text()
    acc = {r["stage"].strip("`"): r for r in table_after(md, "## Reward accuracy")}
    rm = json.loads((run / "rm" / "stage.json").read_text())["metrics"]
    assert float(acc["rm"]["accuracy before"]) == pytest.approx(rm["eval_accuracy_before"], rel=1e-3)
    assert float(acc["rm"]["accuracy after"]) == pytest.approx(rm["eval_accuracy"], rel=1e-3)


def test_report_without_run_json_falls_back_to_stage_folders(run, tmp_path) -> None:
    copy = copy_run(run, tmp_path / "project")
    (copy / "run.json").unlink()
    assert [s.name for s in read_run(copy).stages] == ["sft", "rm", "dpo", "ppo", "eval"]  # by finish time
    md = write_report(copy).read_text()
    assert "no run.json" in md and "`sft` (sft) → `rm` (reward)" in md
    assert_table_equals_metrics(md, "## Evaluation", copy)
    card = build_card(copy, "dpo")
    assert ModelCard(str(card)).data.eval_results


# ---------------------------------------------------------------- cards


def test_adapter_card_metadata_parses_back_with_metrics_json_values(run) -> None:
    card = build_card(run, "dpo", repo_id="someone/tiny-dpo")
    data = ModelCard(str(card)).data
    assert data.library_name == "peft" and data.pipeline_tag == "text-generation"
    assert {"align", "sft", "dpo", "peft", "lora"} <= set(data.tags)
    assert data.base_model is None  # a local base whose config names no hub id
    assert data.license is None  # a local base with no README: never guessed
    assert data.model_name == "tiny-dpo"
    want = {(r["task"], r["metric"]): r["value"] for r in results(run) if r["target"] == "dpo"}
    got = {(e.task_name, e.metric_type): e.metric_value for e in data.eval_results}
    assert got == want  # exactly metrics.json's values, not rounded
    assert 'ADAPTER = "someone/tiny-dpo"' in card.content
    assert_table_equals_metrics(card.content, "## Evaluation", run)


def test_merged_and_reward_cards(run) -> None:
    merged = ModelCard(str(build_card(run, "sft", what="merged"))).data
    assert merged.library_name == "transformers" and merged.pipeline_tag == "text-generation"
    assert {(e.task_name, e.metric_value) for e in merged.eval_results} == {
        (r["task"], r["value"]) for r in results(run) if r["target"] == "sft"
    }
    reward = build_card(run, "rm", what="reward")
    data = ModelCard(str(reward)).data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-classification"
    assert "reward-model" in data.tags and data.eval_results is None  # no eval stage scores a reward model
    assert "AutoModelForSequenceClassification" in reward.content


@pytest.mark.parametrize(
    ("stage", "what", "base_line"),
    [("dpo", "adapter", 'BASE = "path/to/tiny-llama"'), ("sft", "merged", None), ("rm", "reward", None)],
)
def test_card_snippet_loads_the_artifact(run, monkeypatch, stage, what, base_line) -> None:
    code = build_card(run, stage, what=what).content.split("```python\n", 1)[1].split("```", 1)[0]
    if base_line:  # a local base is not on the hub: the card says where it goes; here it is the real folder
        assert base_line in code
        code = code.replace(base_line, f'BASE = "{run.parent.parent / "tiny-llama"}"')
    monkeypatch.chdir(run.parent)  # the snippet's paths are relative to the folder holding the run
    namespace: dict = {}
    exec(compile(code, f"<card {stage}>", "exec"), namespace)
    if what == "reward":
        assert math.isfinite(namespace["reward"])
    else:
        assert namespace["out"].shape[1] > namespace["inputs"]["input_ids"].shape[1]


def test_card_has_no_local_path_or_token(run, tmp_path) -> None:
    copy = copy_run(run, tmp_path / "project")
    rec = json.loads((copy / "run.json").read_text())
    rec["overrides"] = [f"stages.sft.train.hub_token={FAKE_TOKEN}"]
    rec["recipe"]["token"] = FAKE_TOKEN
    (copy / "run.json").write_text(json.dumps(rec))
    for stage, what in (("dpo", "adapter"), ("ppo", "adapter"), ("sft", "merged"), ("rm", "reward")):
        text = str(build_card(copy, stage, what=what))
        assert FAKE_TOKEN not in text and not re.search(r"hf_[A-Za-z0-9]{30,}", text)
        assert str(tmp_path) not in text and str(run.parent.parent) not in text
        assert not ABS_PATH.findall(text), ABS_PATH.findall(text)


def test_embedded_base_card_names_the_hub_id_and_license(run, tmp_path) -> None:
    copy = copy_run(run, tmp_path / "project")
    rec = json.loads((copy / "run.json").read_text())
    rec["base_model"] = {"ref": "smollm2-135m-instruct", "kind": "embedded", "hub_id": SMOL}
    rec["git"] = {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": False}
    (copy / "run.json").write_text(json.dumps(rec))
    card = build_card(copy, "dpo")
    data = ModelCard(str(card)).data
    assert data.base_model == SMOL and data.license == "apache-2.0"
    assert f'BASE = "{SMOL}"' in card.content
    assert "0123456789abcdef0123456789abcdef01234567" in card.content
    md = write_report(copy).read_text()
    assert f"`smollm2-135m-instruct` (embedded; {SMOL})" in md


def test_local_base_license_and_hub_id_from_its_own_files(run, tmp_path) -> None:
    copy = copy_run(run, tmp_path / "project")
    base = tmp_path / "project" / "tiny-llama"
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "someone/tiny-llama-origin"}))
    (base / "README.md").write_text("---\nlicense: mit\n---\n\n# tiny\n")
    data = ModelCard(str(build_card(copy, "dpo"))).data
    assert data.base_model == "someone/tiny-llama-origin" and data.license == "mit"
    (base / "config.json").write_text(json.dumps({**cfg, "_name_or_path": "./some/local/folder"}))
    assert ModelCard(str(build_card(copy, "dpo"))).data.base_model is None  # a path is not a hub id


def test_card_rejects_what_the_stage_did_not_write(run) -> None:
    with pytest.raises(AlignError, match="what='reward'"):
        build_card(run, "rm")
    with pytest.raises(AlignError, match="no merged model"):
        build_card(run, "dpo", what="merged")
    with pytest.raises(AlignError, match="no reward model"):
        build_card(run, "sft", what="reward")
    with pytest.raises(AlignError, match="no stage `nope`"):
        build_card(run, "nope")


def test_plots_are_listed_for_reuse(run) -> None:
    assert [p.name for p in plots(run)] == ["loss.png", "rl.png", "reward_accuracy.png", "eval_eval.png"]
