"""End-to-end runs on tiny local models: artifacts, skip, resume, change detection, safety stops."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import align, align_in_process, run_then_kill, sft_recipe, write_jsonl, write_recipe

SFT_FILES = {
    "stage.json",
    "config.yaml",
    "inputs.json",
    "versions.json",
    "metrics.json",
    "train_log.jsonl",
    "adapter/adapter_model.safetensors",
    "adapter/adapter_config.json",
    "adapter/tokenizer.json",
    "adapter/tokenizer_config.json",
    "adapter/chat_template.jinja",
    "adapter/README.md",
}
EVAL_FILES = {
    "stage.json",
    "config.yaml",
    "inputs.json",
    "versions.json",
    "metrics.json",
    "summary.md",
    "comparison.png",
}


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def stage_json(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "stage.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llama):
    """One full run of the two-stage recipe (LoRA SFT under a real `accelerate launch`, then eval)."""
    tmp = tmp_path_factory.mktemp("e2e")
    recipe = sft_recipe(tmp, tiny_llama, launch={"mode": "accelerate", "accelerate_config": "cpu"})
    path = write_recipe(tmp, recipe)
    res = align("run", str(path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return tmp, path, res


def test_sft_writes_the_exact_artifact_set(finished):
    tmp, _, _ = finished
    run = tmp / "runs" / "tiny"
    assert files(run / "sft") == SFT_FILES
    assert files(run / "ppl") == EVAL_FILES
    assert not (run / ".partial" / "sft").exists()
    info = stage_json(run, "sft")
    assert info["output"] == {"kind": "adapter", "path": "adapter", "base": info["output"]["base"]}
    assert len(info["fingerprint"]) == 16 and len(info["output_sha256"]) == 64
    inputs = json.loads((run / "sft" / "inputs.json").read_text())
    assert len(next(iter(inputs["data"]["train"]["path_sha256"].values()))) == 64
    assert "trl" in json.loads((run / "sft" / "versions.json").read_text())


def test_sft_learns(finished):
    tmp, _, res = finished
    m = stage_json(tmp / "runs" / "tiny", "sft")["metrics"]
    assert math.isfinite(m["first_loss"]) and math.isfinite(m["last_loss"])
    assert m["last_loss"] < m["first_loss"]
    assert m["steps"] == 6 and m["trainable_tensors_changed"] > 0 and m["tokens_seen"] > 0
    log = [json.loads(x) for x in (tmp / "runs" / "tiny" / "sft" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    ev = stage_json(tmp / "runs" / "tiny", "ppl")["metrics"]
    assert set(ev) == {"base/held/perplexity", "sft/held/perplexity"}
    assert ev["sft/held/perplexity"] < ev["base/held/perplexity"]
    assert "held/perplexity" in res.stdout and "loss" in res.stdout  # the closing summary


def test_second_run_skips_everything(finished, capsys):
    tmp, path, _ = finished
    before = (tmp / "runs" / "tiny" / "sft" / "stage.json").stat().st_mtime
    res = align("run", str(path))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "sft: done, skipped" in res.stdout and "ppl: done, skipped" in res.stdout
    assert (tmp / "runs" / "tiny" / "sft" / "stage.json").stat().st_mtime == before
    plan = align_in_process("plan", str(path), capsys=capsys)
    assert "2 of 2 stages done" in plan.stdout


def test_changed_eval_reruns_only_eval(finished):
    tmp, path, _ = finished
    sft_before = (tmp / "runs" / "tiny" / "sft" / "stage.json").stat().st_mtime
    res = align("run", str(path), "stages.ppl.tasks.0.stride=128", "stages.ppl.tasks.0.max_length=128")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (
        "sft: done, skipped" in res.stdout
        and "ppl: running eval on base, sft | python x1 | again: config, data or input changed" in res.stdout
    )
    assert (tmp / "runs" / "tiny" / "sft" / "stage.json").stat().st_mtime == sft_before


def test_force_reruns_stage_and_downstream(finished):
    tmp, path, _ = finished
    res = align("run", str(path), "--force", "sft")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "sft: running sft (lora) from base | cpu x1 | 6 steps | forced" in res.stdout
    assert "ppl: running eval on base, sft" in res.stdout
    assert "were not passed to `accelerate launch`" not in res.stderr  # its defaults are passed, said out loud


def test_kill_during_sft_then_resume(tmp_path, tiny_llama, capsys):
    recipe = sft_recipe(tmp_path, tiny_llama)
    recipe["stages"] = recipe["stages"][:1]
    recipe["stages"][0]["train"].update(max_steps=60, save_steps=3)
    path = write_recipe(tmp_path, recipe)
    ck_dir = tmp_path / "runs" / "tiny" / ".partial" / "sft" / "checkpoints"
    run_then_kill(path, lambda: any((c / "trainer_state.json").is_file() for c in ck_dir.glob("checkpoint-*")))
    kept = sorted(int(c.name.split("-")[1]) for c in ck_dir.glob("checkpoint-*"))
    assert kept, "no checkpoint was written before the kill"
    assert not (tmp_path / "runs" / "tiny" / "sft" / "stage.json").exists()
    assert "resumable" in align_in_process("plan", str(path), capsys=capsys).stdout
    res = align("run", str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    m = stage_json(tmp_path / "runs" / "tiny", "sft")["metrics"]
    assert m["resumed_from"] is not None and int(m["resumed_from"].split("-")[1]) >= kept[0]
    assert m["steps"] == 60
    # the figures come from the whole stage: the same as an uninterrupted run's, as the weights are
    recipe["output_dir"] = str(tmp_path / "straight")
    straight = align("run", str(write_recipe(tmp_path, recipe, "straight.yaml")))
    assert straight.returncode == 0, straight.stderr[-3000:]
    s = stage_json(tmp_path / "straight" / "tiny", "sft")["metrics"]
    assert s["resumed_from"] is None and s["weights_sha256"] == m["weights_sha256"]
    for key in ("first_loss", "last_loss", "train_loss"):
        assert m[key] == s[key], key
    log = (tmp_path / "runs" / "tiny" / "sft" / "train_log.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in log if '"loss"' in x]
    assert steps == list(range(1, 61))  # each step once, though some ran twice


def test_nan_loss_stops_with_the_step_named(tmp_path, tiny_llama):
    recipe = sft_recipe(tmp_path, tiny_llama, adapter={"type": "full"})
    recipe["stages"] = recipe["stages"][:1]
    recipe["stages"][0]["train"].update(learning_rate=1e12, max_steps=30, max_grad_norm=0)
    res = align("run", str(write_recipe(tmp_path, recipe)))
    assert res.returncode == 1
    assert "became nan at step" in res.stderr.lower() and "checkpoint" in res.stderr
    assert not (tmp_path / "runs" / "tiny" / "sft").exists()


def test_a_stage_that_learned_nothing_is_not_marked_done(tmp_path, tiny_llama):
    """max_length 1 cuts every completion off: TRL trains on no token (loss 0, no weight moves). The stage fails
    with the likely cause named instead of reporting a trained adapter."""
    recipe = sft_recipe(tmp_path, tiny_llama)
    recipe["stages"] = recipe["stages"][:1]
    recipe["stages"][0]["train"].update(max_length=1, max_steps=2)
    res = align("run", str(write_recipe(tmp_path, recipe)))
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "no trainable weight changed in 2 steps" in res.stderr and "`train.max_length` (1)" in res.stderr
    assert not (tmp_path / "runs" / "tiny" / "sft" / "stage.json").exists()


def test_unwritable_run_folder_fails_before_training(tmp_path, tiny_llama):
    recipe = sft_recipe(tmp_path, tiny_llama)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    recipe["output_dir"] = str(blocker / "runs")
    res = align("run", str(write_recipe(tmp_path, recipe)))
    assert res.returncode == 2 and "output_dir:" in res.stderr and "is a file, so the run folder" in res.stderr
    assert "sft: running" not in res.stdout


def test_gpt2_lora_c_attn_example_and_merge(tmp_path, tiny_gpt2):
    """The seed course's LoRA example (r=8, alpha=16, dropout 0.1, c_attn) as a recipe, merged at the end."""
    from align.recipe import load_recipe

    example = Path(__file__).resolve().parents[1] / "recipes" / "examples" / "gpt2_lora_c_attn.yaml"
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(40)])
    ov = [
        f"model={tiny_gpt2}",
        f"datasets.alpaca.path={tmp_path / 'a.jsonl'}",
        f"output_dir={tmp_path / 'runs'}",
        "stages.sft.train.max_steps=4",
        "stages.sft.train.max_length=64",
        "stages.sft.merge=true",
        "stages.sft.launch.mode=python",
    ]
    spec = load_recipe(example, ov).stages[0].adapter
    assert (spec.r, spec.alpha, spec.dropout, spec.target_modules) == (8, 16, 0.1, ["c_attn"])
    res = align("run", str(example), *ov)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "runs" / "gpt2-lora-c-attn" / "sft"
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["target_modules"]) == (8, 16, 0.1, ["c_attn"])
    assert (out / "merged" / "model.safetensors").is_file()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8]])
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2), out / "adapter").eval()
    assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)


def test_qlora_trains_on_cpu_after_the_gradient_check(tmp_path, tiny_llama):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the `qlora` extra)")
    recipe = sft_recipe(tmp_path, tiny_llama, adapter={"type": "qlora", "r": 4, "alpha": 8})
    recipe["stages"] = recipe["stages"][:1]
    res = align("run", str(write_recipe(tmp_path, recipe)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "QLoRA gradient check on CPU" in res.stdout
    m = stage_json(tmp_path / "runs" / "tiny", "sft")["metrics"]
    assert m["trainable_tensors_changed"] > 0 and m["last_loss"] < m["first_loss"]


def test_dora_on_chat_messages_with_a_held_out_split(tmp_path, tiny_llama):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Say {i}"},
                {"role": "assistant", "content": f"{i} it is."},
                {"role": "user", "content": "Again"},
                {"role": "assistant", "content": f"{i}."},
            ]
        }
        for i in range(40)
    ]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    recipe = sft_recipe(tmp_path, tiny_llama, adapter={"type": "dora", "r": 4, "alpha": 8}, data="chat")
    recipe["datasets"]["chat"] = {"path": str(tmp_path / "chat.jsonl"), "eval_fraction": 0.1}
    recipe["stages"] = recipe["stages"][:1]
    res = align("run", str(write_recipe(tmp_path, recipe)))
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "runs" / "tiny" / "sft"
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    assert math.isfinite(stage_json(tmp_path / "runs" / "tiny", "sft")["metrics"]["eval_loss"])


def test_hub_dataset_without_network_fails_fast(tmp_path, tiny_llama):
    recipe = sft_recipe(tmp_path, tiny_llama)
    recipe["datasets"]["train"] = {"path": "someone/not-a-cached-dataset"}
    t0 = time.time()
    res = align("run", str(write_recipe(tmp_path, recipe)))
    assert res.returncode == 2 and "cannot reach hub dataset `someone/not-a-cached-dataset`" in res.stderr
    assert "datasets.train.path" in res.stderr and time.time() - t0 < 60
    assert "sft: running" not in res.stdout


def test_ctrl_c_checkpoints_and_resumes(tmp_path, tiny_llama, capsys):
    """SIGINT to `align run` (as Ctrl-C sends) under a real accelerate launch: exit 130, resumable state."""
    recipe = sft_recipe(tmp_path, tiny_llama, launch={"mode": "accelerate", "accelerate_config": "cpu"})
    recipe["stages"] = recipe["stages"][:1]
    recipe["stages"][0]["train"].update(max_steps=100000, save_steps=100000)
    path = write_recipe(tmp_path, recipe)
    log = tmp_path / "train_log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "align", "run", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out_log = tmp_path / "runs" / "tiny" / ".partial" / "sft" / "out" / "train_log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (out_log.is_file() and len(out_log.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    log.write_text(out)
    assert proc.returncode == 130, out[-3000:]
    cks = list((tmp_path / "runs" / "tiny" / ".partial" / "sft" / "checkpoints").glob("checkpoint-*"))
    assert cks and all((c / "trainer_state.json").is_file() for c in cks), "Ctrl-C saves a checkpoint"
    assert "resumable" in align_in_process("plan", str(path), capsys=capsys).stdout


def test_eval_stage_with_a_task_file_and_the_gate(tmp_path, tiny_llama, capsys):
    """An MMLU task file (made here) in an eval stage, then `align compare` against itself and a worse copy."""
    import csv

    for split, n in (("test", 6), ("dev", 2)):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        with (tmp_path / "mmlu" / split / f"toy_{split}.csv").open("w", newline="") as fh:
            csv.writer(fh).writerows(
                [[f"What is {i} + 1?", str(i), str(i + 1), str(i + 2), str(i + 3), "B"] for i in range(n)]
            )
    task = tmp_path / "toy_mmlu.yaml"
    task.write_text(
        f"name: toy_mmlu\nversion: 1\ntype: mmlu\ndata: {{path: {tmp_path / 'mmlu'}, format: mmlu_csv}}\n"
        "mmlu: {num_fewshot: 2}\n"
    )
    recipe = sft_recipe(tmp_path, tiny_llama)
    recipe["stages"] = [{"name": "ev", "type": "eval", "tasks": [{"task": str(task)}, {"data": "held"}]}]
    res = align("run", str(write_recipe(tmp_path, recipe)))
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "runs" / "tiny" / "ev"
    m = json.loads((out / "metrics.json").read_text())
    keys = {(r["target"], r["task"], r["metric"]) for r in m["results"]}
    assert keys == {
        ("base", "toy_mmlu", "accuracy"),
        ("base", "toy_mmlu/toy", "accuracy"),
        ("base", "held", "perplexity"),
    }
    acc = next(r for r in m["results"] if r["task"] == "toy_mmlu")
    assert 0 <= acc["value"] <= 100 and acc["n"] == 6 and acc["stderr"] is not None
    from align.cli import main

    assert main(["compare", str(out), "--baseline", str(out / "metrics.json")]) == 0
    worse = json.loads((out / "metrics.json").read_text())
    for r in worse["results"]:
        r["value"] = r["value"] * 2 if r["metric"] == "perplexity" else r["value"]
    (tmp_path / "worse.json").write_text(json.dumps(worse))
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "worse.json"), "--baseline", str(out / "metrics.json")]) == 1
    assert "REGRESSED" in capsys.readouterr().out


def test_align_eval_standalone_on_a_model_and_a_run(finished, tmp_path, capsys):
    """`align eval` on a base model folder and on a finished run (its adapter), gated against itself."""
    from align.cli import main

    tmp, _, _ = finished
    held = tmp / "held.jsonl"
    task = tmp_path / "held_bleu.yaml"
    task.write_text(
        f"name: held_bleu\ntype: generation\ndata: {{path: {held}, format: jsonl, input_field: "
        "instruction, reference_field: output}\nprompt: {template: '{instruction}'}\n"
        "generation: {max_new_tokens: 8}\nmetric: {name: bleu}\nlimit: 4\n"
    )
    run = tmp / "runs" / "tiny"
    from align.models import locate

    base_model = locate(json.loads((run / "sft" / "stage.json").read_text())["output"], run / "sft")["base"]
    assert main(["eval", base_model, str(run), "--tasks", str(task), "--out", str(tmp_path / "e")]) == 0
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert {(r["target"], r["metric"]) for r in m["results"]} == {(Path(base_model).name, "bleu"), ("sft", "bleu")}
    out = tmp_path / "e2"
    assert (
        main(
            [
                "eval",
                str(run),
                "--tasks",
                str(task),
                "--out",
                str(out),
                "--baseline",
                str(tmp_path / "e" / "metrics.json"),
            ]
        )
        == 2
    )  # different targets: not comparable
    capsys.readouterr()
    assert (
        main(["eval", str(run), "--tasks", str(task), "--out", str(out), "--baseline", str(out / "metrics.json")]) == 0
    )
    assert "passed, 0 regressed" in capsys.readouterr().out


def test_a_moved_run_stays_done_and_loads(tmp_path, tiny_llama, monkeypatch, capsys):
    """`mv` of a whole project (recipe, data, runs): every stage plans as done, a re-run skips, and the eval
    stage forced to re-run loads the moved adapter with the old folder gone."""
    import shutil

    old = tmp_path / "old"
    recipe = sft_recipe(old, tiny_llama)
    recipe["datasets"] = {"train": {"path": "train.jsonl"}, "held": {"path": "./held.jsonl"}}
    recipe["output_dir"] = "runs"
    (old / "recipe.yaml").write_text(__import__("yaml").safe_dump(recipe, sort_keys=False))
    assert align("run", "recipe.yaml", cwd=old).returncode == 0
    before = json.loads((old / "runs" / "tiny" / "ppl" / "metrics.json").read_text())["results"]
    new = tmp_path / "elsewhere" / "project"
    new.parent.mkdir()
    shutil.move(str(old), str(new))
    assert not old.exists()
    monkeypatch.chdir(new)
    plan = align_in_process("plan", "recipe.yaml", capsys=capsys)
    assert plan.returncode == 0 and "2 of 2 stages done" in plan.stdout, plan.stdout
    again = align("run", "recipe.yaml", cwd=new)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 2, again.stdout
    forced = align("run", "recipe.yaml", "--force", "ppl", cwd=new)
    assert forced.returncode == 0, forced.stderr[-3000:]
    after = json.loads((new / "runs" / "tiny" / "ppl" / "metrics.json").read_text())["results"]
    assert [r["value"] for r in after] == pytest.approx([r["value"] for r in before])
    for f in (new / "runs" / "tiny").rglob("*"):
        if f.is_file() and f.suffix in {".json", ".yaml", ".jsonl", ".md"}:
            assert str(old) not in f.read_text(), f"{f} records the old folder"


def test_the_recipe_is_validated_once_per_run(tmp_path, tiny_llama, monkeypatch, capsys):
    """`align run` validates the recipe once; each stage process reads the orchestrator's plan file instead."""
    import align.pipeline as pipeline
    from align.cli import main

    calls = []
    real = pipeline.load_recipe
    monkeypatch.setattr(pipeline, "load_recipe", lambda *a, **k: calls.append(a) or real(*a, **k))
    path = write_recipe(tmp_path, sft_recipe(tmp_path, tiny_llama))
    assert main(["run", str(path)]) == 0
    assert len(calls) == 1, calls  # not once per stage process, re-plan and summary (2N+2 before)
    out = capsys.readouterr().out
    assert "sft" in out and "ppl" in out and "2 of 2" not in out
    run = json.loads((tmp_path / "runs" / "tiny" / "run.json").read_text())
    assert [s["name"] for s in run["stages"]] == ["sft", "ppl"] and run["recipe"]["name"] == "tiny"
    assert not list((tmp_path / "runs" / "tiny" / ".partial").glob("*.plan*.json"))  # removed after each stage


def test_a_stage_process_reads_the_plan_file_and_validates_without_one(tmp_path, tiny_llama):
    from align.pipeline import make_plan
    from align.rundir import plan_file, plan_record

    path = write_recipe(tmp_path, sft_recipe(tmp_path, tiny_llama))
    plan = make_plan(path)
    pf = plan_file(plan.run_dir, "sft")
    pf.parent.mkdir(parents=True)
    pf.write_text(json.dumps(plan_record(plan)))
    path.write_text("name: [broken\n")  # the stage process must not read the recipe again
    res = align("stage", str(path), "sft", "--plan", str(pf))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "runs" / "tiny" / "sft" / "stage.json").is_file()
    by_hand = align("stage", str(path), "ppl")  # started by hand: it validates, and says what is wrong
    assert by_hand.returncode == 2 and "not valid YAML" in by_hand.stderr


def test_a_second_concurrent_run_is_busy_with_exit_3(tmp_path, tiny_llama):
    """Exit 3, not 1 (a stage failed) nor 2 (bad input): the run folder is held; the first run carries on."""
    recipe = sft_recipe(tmp_path, tiny_llama)
    recipe["stages"] = recipe["stages"][:1]
    recipe["stages"][0]["train"].update(max_steps=40, save_steps=20)
    path = write_recipe(tmp_path, recipe)
    first = subprocess.Popen(
        [sys.executable, "-m", "align", "run", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        line = ""
        while time.time() < deadline and "running sft" not in line:  # the first run holds the lock by now
            line = first.stdout.readline()
        second = align("run", str(path))
        assert second.returncode == 3, second.stdout[-2000:] + second.stderr[-2000:]
        assert "held by another align process" in second.stderr and "Traceback" not in second.stderr
    finally:
        rest = first.communicate(timeout=600)[0]
    assert first.returncode == 0, rest[-3000:]
    assert stage_json(tmp_path / "runs" / "tiny", "sft")["metrics"]["steps"] == 40
