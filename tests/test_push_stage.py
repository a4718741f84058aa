"""The push stage in a recipe and `align push` / `align merge` / `align report`, through the real CLI: the card
arrives with the files, its numbers equal metrics.json, the token never shows, refusals come before training."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml
from conftest import sft_recipe, write_recipe
from hubserver import FakeHub
from test_hub import TOKEN, hub_env


def cli(*args, env, cwd=None, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "align", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def push_recipe(tmp, model, **push):
    recipe = sft_recipe(tmp, model)
    recipe["stages"][0]["train"].update(max_steps=2, save_steps=100)
    recipe["stages"].append({"name": "push", "type": "push", "base_model": "base-org/tiny-llama", **push})
    return write_recipe(tmp, recipe)


def test_push_stage_sends_adapter_and_card_to_the_hub(tmp_path, tiny_llama):
    path = push_recipe(tmp_path, tiny_llama, repo_id="my-org/tiny-sft", revision="v1", private=True)
    with FakeHub() as hub:
        res = cli("run", str(path), env=hub_env(hub.url, tmp_path))
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        (commit,) = hub.commits
    assert TOKEN not in res.stdout + res.stderr
    assert commit["repo"] == "my-org/tiny-sft" and commit["revision"] == "v1"
    assert "sft" in commit["header"]["summary"] and "tiny" in commit["header"]["summary"]
    files = commit["files"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "base-org/tiny-llama"
    card = files["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "base-org/tiny-llama" and meta["library_name"] == "peft"
    run = tmp_path / "runs" / "tiny"
    results = json.loads((run / "ppl" / "metrics.json").read_text())["results"]
    mine = {r["metric"]: r["value"] for r in results if r["target"] == "sft"}
    got = {m["type"]: m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    assert got == mine  # the card's numbers are metrics.json's
    assert str(tmp_path) not in card and "hf_" not in card
    assert (run / "report.md").is_file() and "report:" in res.stdout
    push = json.loads((run / "push" / "stage.json").read_text())
    assert push["metrics"]["url"].endswith("my-org/tiny-sft/tree/v1") and push["metrics"]["files"] == len(files)


def test_a_refused_token_stops_the_run_before_anything_trains(tmp_path, tiny_llama):
    path = push_recipe(tmp_path, tiny_llama, repo_id="my-org/tiny-sft")
    with FakeHub() as hub:
        hub.fail["whoami"] = (401, "Invalid credentials in Authorization header")
        res = cli("run", str(path), env=hub_env(hub.url, tmp_path))
        assert hub.commits == []
    assert res.returncode == 2 and "401" in res.stderr and TOKEN not in res.stdout + res.stderr
    assert not (tmp_path / "runs" / "tiny" / "sft").exists()  # nothing trained


def test_align_push_dry_run_and_folder_target_and_merge(tmp_path, tiny_llama):
    path = push_recipe(tmp_path, tiny_llama, to=str(tmp_path / "registry"), dry_run=True)
    env = hub_env("http://127.0.0.1:9", tmp_path, token=None)  # no hub, no token: nothing may reach one
    assert cli("run", str(path), env=env).returncode == 0
    run = tmp_path / "runs" / "tiny"
    assert (run / "push" / "pushed" / "README.md").is_file() and not (tmp_path / "registry").exists()
    nobase = cli("push", str(run), "--repo-id", "my-org/x", "--dry-run", env=env)
    assert nobase.returncode == 2 and "--base-model" in nobase.stderr
    dry = cli("push", str(run), "--repo-id", "my-org/x", "--dry-run", "--base-model", "o/b", env=env)
    assert dry.returncode == 0 and "dry run: would push" in dry.stdout, dry.stderr
    assert (run / "push-dry-run" / "sft" / "adapter_model.safetensors").is_file()
    to = cli("push", str(run / "sft"), "--to", f"file://{tmp_path / 'reg2'}", "--base-model", "o/b", env=env)
    assert to.returncode == 0, to.stderr
    assert {"README.md", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "reg2").iterdir()}
    no_token = cli("push", str(run), "--repo-id", "my-org/x", "--what", "merged", env=env)
    assert no_token.returncode == 2 and "token" in no_token.stderr
    not_done = cli("push", str(run / "nope"), "--to", str(tmp_path / "r3"), env=env)
    assert not_done.returncode == 2
    merged = cli("merge", str(run / "sft"), "--out", str(tmp_path / "merged"), "--dtype", "bf16", env=env)
    assert merged.returncode == 0, merged.stderr
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert next(model.parameters()).dtype == torch.bfloat16
