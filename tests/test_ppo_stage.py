"""The `ppo` stage in a recipe: PPO in the shared tiny chain (conftest.rl_chain: SFT -> reward -> DPO -> PPO ->
eval; its skip on a re-run is checked in test_preference_stages.py), kill and resume."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from conftest import align, run_then_kill, write_recipe
from test_preference_stages import PY, chain_recipe

PPO_TRAIN = {
    "max_steps": 4,
    "batch_size": 4,
    "mini_batch_size": 2,
    "ppo_epochs": 2,
    "max_new_tokens": 6,
    "learning_rate": 1e-3,
    "save_steps": 2,
}
PPO = {
    "name": "ppo",
    "type": "ppo",
    "data": "pairs",
    "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    "train": PPO_TRAIN,
    "launch": PY,
}
STEP_KEYS = {"reward_mean", "kl", "entropy", "clipfrac", "value_loss", "approx_kl", "policy_loss"}


@pytest.fixture(scope="module")
def rlhf(rl_chain):
    return rl_chain


def test_ppo_runs_in_the_chain_and_logs_every_step(rlhf) -> None:
    tmp, _ = rlhf
    run = tmp / "runs" / "chain"
    info = json.loads((run / "ppo" / "stage.json").read_text())
    assert info["output"]["kind"] == "adapter" and (run / "ppo" / "adapter" / "adapter_model.safetensors").is_file()
    assert isinstance(info["output"]["base"], dict)  # the DPO adapter (on the SFT one) it started from
    m = info["metrics"]
    assert m["steps"] == 4 and math.isfinite(m["reward_last"]) and math.isfinite(m["kl_last"])
    log = [json.loads(x) for x in (run / "ppo" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(set(r) >= STEP_KEYS for r in log)
    inputs = json.loads((run / "ppo" / "inputs.json").read_text())
    assert {"dpo", "rm"} <= set(inputs)  # policy and reward model, with their hashes
    ev = json.loads((run / "eval" / "stage.json").read_text())["metrics"]
    assert "ppo/sft/perplexity" in ev
    from test_console import scalar_tags

    logged = scalar_tags(run / "tensorboard" / "ppo")  # one run group per recipe run, the stage as the run
    assert logged["reward_mean"] == pytest.approx([r["reward_mean"] for r in log], rel=1e-6)  # float32 there
    assert len(logged["kl"]) == 4


def test_kill_during_ppo_then_resume(tmp_path, tiny_llama) -> None:
    stage = {**PPO, "reward": "rewards:short_and_sum", "train": {**PPO_TRAIN, "max_steps": 40, "save_steps": 2}}
    path = write_recipe(tmp_path, chain_recipe(tmp_path, tiny_llama, [stage]))
    ck_dir = tmp_path / "runs" / "chain" / ".partial" / "ppo" / "checkpoints"
    run_then_kill(path, lambda: any((c / "trainer_state.json").is_file() for c in ck_dir.glob("checkpoint-*")))
    kept = sorted(
        int(c.name.split("-")[1]) for c in ck_dir.glob("checkpoint-*") if (c / "trainer_state.json").is_file()
    )
    assert kept, "no checkpoint was written before the kill"
    assert "resumable" in align("plan", str(path)).stdout
    res = align("run", str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "runs" / "chain" / "ppo" / "stage.json").read_text())["metrics"]
    assert m["resumed_from"] is not None and int(m["resumed_from"].split("-")[1]) >= kept[0]
    assert m["steps"] == 40
    log = [json.loads(x) for x in (tmp_path / "runs" / "chain" / "ppo" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41))  # each step once, though some ran twice
    # one recipe and seed, one set of weights: killed and resumed, or run straight through (twice)
    recipe = yaml.safe_load(path.read_text())
    recipe["output_dir"] = str(tmp_path / "straight")
    straight = write_recipe(tmp_path, recipe, "straight.yaml")
    for attempt in ("run", "again"):
        res = align("run", str(straight), *(["--force", "ppo"] if attempt == "again" else []))
        assert res.returncode == 0, res.stderr[-3000:]
        s = json.loads((tmp_path / "straight" / "chain" / "ppo" / "stage.json").read_text())["metrics"]
        assert s["weights_sha256"] == m["weights_sha256"], attempt
        assert s["reward_last"] == m["reward_last"] and s["kl_last"] == m["kl_last"], attempt
