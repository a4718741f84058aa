"""Kill -9 during each training stage type, run the same command again: the resumed stage reports what an
uninterrupted run of the same recipe reports (weights, every metric but timing and memory, each step's log).

SFT and PPO have their own such tests (test_pipeline.py, test_ppo_stage.py); here: reward, dpo, kto, orpo, grpo
and rloo, each killed at a different kind of point (first checkpoint, a later one in the second epoch, inside a
gradient-accumulation run, inside a GRPO/RLOO generation block, with LoRA dropout drawing random numbers).
The uninterrupted runs are one recipe of all six stages (each `from: base`), started in the background while
the first stage type is killed and resumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import align, run_then_kill, write_recipe
from test_preference_stages import LORA, PY, chain_recipe

# A reward whose completions differ within a group (TRL hands chat completions as message lists), so the
# advantages are not all zero and GRPO/RLOO really move the weights.
VARIED_REWARD = """
def varied(prompts, completions, **kw):
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(sum(ch in "aeiou" for ch in t)) - 0.05 * len(t) for t in texts]
"""

PAIR_TRAIN = {"per_device_train_batch_size": 2, "learning_rate": 5e-3, "save_steps": 2, "max_length": 64}
ONLINE_TRAIN = {
    "per_device_train_batch_size": 2,
    "num_generations": 2,
    "max_completion_length": 6,
    "learning_rate": 1e-3,
    "save_steps": 3,
}

# stage type -> (stage's train/adapter fields, the checkpoint step from which on the run is killed)
CASES: dict[str, tuple[dict, int]] = {
    # 30 training pairs, 4 a step: the kill lands in the second epoch (data order of a new epoch)
    "reward": ({"train": {**PAIR_TRAIN, "per_device_train_batch_size": 4, "max_steps": 14}}, 10),
    # LoRA dropout draws random numbers every step: the RNG state must come back with the checkpoint
    "dpo": ({"train": {**PAIR_TRAIN, "max_steps": 10, "beta": 0.1}, "adapter": {**LORA, "dropout": 0.1}}, 2),
    # two micro-batches per step (KTO's KL term pairs each batch with shifted completions)
    "kto": ({"train": {**PAIR_TRAIN, "max_steps": 10, "gradient_accumulation_steps": 2, "save_steps": 3}}, 3),
    "orpo": ({"train": {**PAIR_TRAIN, "max_steps": 10}}, 4),
    # one sampled batch serves two steps (num_iterations 2): checkpoint-3 falls inside a generation block
    "grpo": ({"train": {**ONLINE_TRAIN, "max_steps": 10, "num_iterations": 2}}, 3),
    # one sampled batch split over two steps (steps_per_generation 2): checkpoint-3 falls inside it too
    "rloo": ({"train": {**ONLINE_TRAIN, "max_steps": 10, "steps_per_generation": 2}}, 3),
}
# what may differ between two runs of one recipe: how long they took, how much memory, and that one resumed
NOT_COMPARED = {"train_runtime_s", "peak_memory_bytes", "resumed_from"}


def is_timing(key: str) -> bool:
    return any(t in key for t in ("time", "runtime", "per_second"))


def stage_spec(kind: str) -> dict:
    fields, _ = CASES[kind]
    online = kind in ("grpo", "rloo")
    stage = {
        "name": kind,
        "type": kind,
        "from": "base",
        "data": "prompts" if online else "pairs",
        "adapter": LORA,
        "launch": PY,
        **fields,
    }
    if online:
        stage["reward"] = "kr_rewards:varied"
    return stage


def recipe_for(tmp: Path, tiny_llama: Path, kinds: list[str]) -> Path:
    recipe = chain_recipe(tmp, tiny_llama, [stage_spec(k) for k in kinds])
    (tmp / "kr_rewards.py").write_text(VARIED_REWARD)
    return write_recipe(tmp, recipe)


class Background:
    """`align run` of the uninterrupted recipe, started once, waited for when a test first needs it."""

    def __init__(self, tmp: Path, path: Path):
        self.tmp, self.log = tmp, tmp / "straight.log"
        with self.log.open("w") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "align", "run", str(path)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"},
            )

    def metrics(self, kind: str) -> tuple[dict, list[dict]]:
        """One stage's result, as soon as that stage is done (the run goes on with the next ones)."""
        done = self.tmp / "runs" / "chain" / kind / "stage.json"  # written last, then the folder is renamed in place
        deadline = time.time() + 900
        while not done.is_file() and self.proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert done.is_file(), self.log.read_text()[-3000:]
        return stage_result(done.parent)


# the default suite kills the types with state of their own beyond the shared TRL skeleton (dropout RNG, GRPO/RLOO's
# sampled batch); reward, kto and orpo resume through the same skeleton and run with `pytest -m slow` (time budget)
SLOW_KINDS = ("reward", "kto", "orpo")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_llama, request):
    tmp = tmp_path_factory.mktemp("straight")
    selected = {  # only the stage types this session runs: the uninterrupted chain is the costly part
        item.callspec.params["kind"]
        for item in request.session.items
        if item.originalname == "test_kill_during_stage_then_resume_equals_uninterrupted"
    }
    bg = Background(tmp, recipe_for(tmp, tiny_llama, [k for k in CASES if k in selected]))
    yield bg
    if bg.proc.poll() is None:
        os.killpg(bg.proc.pid, signal.SIGKILL)
        bg.proc.wait()


def stage_result(folder: Path) -> tuple[dict, list[dict]]:
    metrics = json.loads((folder / "stage.json").read_text())["metrics"]
    log = [json.loads(x) for x in (folder / "train_log.jsonl").read_text().splitlines()]
    return metrics, log


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k in SLOW_KINDS else k for k in CASES])
def test_kill_during_stage_then_resume_equals_uninterrupted(tmp_path, tiny_llama, straight, kind) -> None:
    fields, kill_at = CASES[kind]
    max_steps = fields["train"]["max_steps"]
    path = recipe_for(tmp_path, tiny_llama, [kind])
    ck_dir = tmp_path / "runs" / "chain" / ".partial" / kind / "checkpoints"

    def kept() -> list[int]:
        return sorted(
            int(c.name.split("-")[1]) for c in ck_dir.glob("checkpoint-*") if (c / "trainer_state.json").is_file()
        )

    run_then_kill(path, lambda: any(s >= kill_at for s in kept()), poll=0.05)
    before_resume = kept()
    assert any(s >= kill_at for s in before_resume), f"no checkpoint-{kill_at} or later before the kill"
    assert not (tmp_path / "runs" / "chain" / kind / "stage.json").exists(), "the stage finished before the kill"

    res = align("run", str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    m, log = stage_result(tmp_path / "runs" / "chain" / kind)
    assert m["resumed_from"] == f"checkpoint-{before_resume[-1]}" and before_resume[-1] < max_steps
    assert m["steps"] == max_steps and m["trainable_tensors_changed"] > 0
    steps = [r["step"] for r in log if "loss" in r and "train_loss" not in r]
    assert steps == list(range(1, max_steps + 1))  # each step once, though some ran twice

    s, straight_log = straight.metrics(kind)
    assert s["resumed_from"] is None
    assert set(m) == set(s)
    assert s["weights_sha256"] == m["weights_sha256"]
    differ = {k: (m[k], s[k]) for k in set(m) - NOT_COMPARED if m[k] != s[k]}
    assert not differ, f"{kind}: resumed vs uninterrupted {differ}"
    # every logged step (and the held-out evaluation before training) as the uninterrupted run logged it
    assert len(log) == len(straight_log)
    for got, want in zip(log, straight_log, strict=True):
        assert {k: v for k, v in got.items() if not is_timing(k)} == {
            k: v for k, v in want.items() if not is_timing(k)
        }, got["step"]
