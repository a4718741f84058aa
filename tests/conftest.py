"""Tiny models and data built locally, so the suite runs offline on a CPU in minutes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Convert 3 meters to centimeters. 3 meters is 300 centimeters.",
    "The sum of 12 and 7 is 19. Add the two numbers and answer in one sentence.",
    "Spell the word apple letter by letter: A-P-P-L-E.",
    "### Instruction:\n### Input:\n### Response:\n user assistant system",
] * 20


def build_tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    if chat:
        fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer llama with hidden size 32 and a ChatML tokenizer, saved as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer(chat=True)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 (fused `c_attn`) whose tokenizer has no chat template."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("tiny-gpt2")
    tok = build_tokenizer(chat=False)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=512,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    import torch

    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def rl_chain(tmp_path_factory, tiny_llama) -> tuple[Path, Path]:
    """One real run of the whole tiny chain, shared read-only by test_preference_stages.py (reward model, DPO,
    pinned first losses), test_ppo_stage.py (PPO in a chain, TensorBoard) and test_report_card.py (report, cards):
    SFT (merged too) -> reward model -> DPO -> PPO (from DPO) -> eval of base, sft, dpo and ppo. The base model is
    copied beside the runs, so that a copy of the whole project folder keeps the run's relative records. Returns
    (project folder, recipe); the run is `project/runs/chain`. A test that changes a run works on a copy."""
    import shutil

    from test_ppo_stage import PPO, PPO_TRAIN
    from test_preference_stages import DPO, REWARD, SFT, chain_recipe

    tmp = tmp_path_factory.mktemp("chain")
    base = tmp / "tiny-llama"
    shutil.copytree(tiny_llama, base)
    stages = [
        {**SFT, "merge": True},
        REWARD,
        DPO,
        {**PPO, "train": {**PPO_TRAIN, "report_to": "tensorboard"}},  # align's own loop logs to trackers too
        {"name": "eval", "type": "eval", "targets": ["base", "sft", "dpo", "ppo"], "tasks": [{"data": "sft"}]},
    ]
    path = write_recipe(tmp, chain_recipe(tmp, base, stages))
    res = align("run", str(path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return tmp, path


@pytest.fixture(scope="session")
def adapters_run(tmp_path_factory, tiny_llama) -> Path:
    """One real run of adapters, shared read-only by test_merge.py and test_hub.py: LoRA SFT (also merged), DoRA SFT
    on the base, a LoRA SFT on top of the first one, a LoRA reward model, an eval stage. Returns the run folder."""
    import copy

    tmp = tmp_path_factory.mktemp("adapters")
    recipe = sft_recipe(tmp, tiny_llama, merge=True)
    sft, ppl = recipe["stages"]
    sft["train"].update(max_steps=4, learning_rate=3e-2, save_steps=100)  # the adapters change the logits clearly
    dora = copy.deepcopy(sft) | {
        "name": "dora",
        "from": "base",
        "merge": False,
        "adapter": {"type": "dora", "r": 4, "alpha": 8},
    }
    stacked = copy.deepcopy(sft) | {"name": "sft2", "from": "sft", "merge": False}
    stacked["train"]["max_steps"] = 2
    pairs = [
        {"prompt": f"Add {i} and 7.", "chosen": f"The sum is {i + 7}.", "rejected": "A-P-P-L-E."} for i in range(24)
    ]
    write_jsonl(tmp / "pairs.jsonl", pairs)
    recipe["datasets"]["pairs"] = {"path": str(tmp / "pairs.jsonl"), "eval_fraction": 0.25}
    rm = {k: v for k, v in copy.deepcopy(sft).items() if k != "merge"} | {
        "name": "rm",
        "type": "reward",
        "data": "pairs",
    }
    recipe["stages"] = [sft, dora, stacked, rm, ppl]
    res = align("run", str(write_recipe(tmp, recipe)))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return tmp / "runs" / "tiny"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alpaca_rows(n: int = 48) -> list[dict]:
    return [
        {
            "instruction": f"Convert {i} meters to centimeters.",
            "input": "",
            "output": f"{i} meters is {i * 100} centimeters.",
        }
        for i in range(n)
    ]


def write_recipe(tmp: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    recipe.setdefault("output_dir", str(tmp / "runs"))
    p = tmp / name
    p.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return p


def sft_recipe(tmp: Path, model: Path, **stage_kw) -> dict:
    """A two-stage recipe (LoRA SFT, then before/after perplexity) on tiny data."""
    write_jsonl(tmp / "train.jsonl", alpaca_rows())
    write_jsonl(tmp / "held.jsonl", alpaca_rows(8))
    sft = {
        "name": "sft",
        "type": "sft",
        "data": "train",
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "train": {
            "max_steps": 6,
            "per_device_train_batch_size": 4,
            "learning_rate": 5e-3,
            "save_steps": 2,
            "max_length": 64,
        },
        "launch": {"mode": "python"},
    }
    sft.update(stage_kw)
    return {
        "name": "tiny",
        "model": str(model),
        "datasets": {"train": {"path": str(tmp / "train.jsonl")}, "held": {"path": str(tmp / "held.jsonl")}},
        "stages": [sft, {"name": "ppl", "type": "eval", "tasks": [{"type": "perplexity", "data": "held"}]}],
    }


def align(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh process, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "align", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def run_then_kill(
    cmd: Path | Sequence[str],
    ready: Callable[[], bool],
    *,
    timeout: float = 300,
    poll: float = 0.2,
    linger: float = 120,
) -> subprocess.Popen:
    """Start `cmd` (a recipe path: `align run PATH`; or a full argv) in a session of its own, wait until `ready()`
    holds (a checkpoint is on disk, say), the process exits, or `timeout` seconds pass, then SIGKILL its whole
    process group: the orchestrator gets no chance to clean up. Its stage processes run in sessions of their own
    and are not killed: they see the orchestrator gone at their next step and exit without finalizing (within
    `linger` seconds, or this fails). This returns once they have, so what the caller inspects is what a re-run
    finds (a checkpoint still being written when the group was killed is complete by then, or never will be).
    Returns the reaped orchestrator; whether `ready()` held before the kill is for the caller to check."""
    import psutil

    argv = [sys.executable, "-m", "align", "run", str(cmd)] if isinstance(cmd, Path) else list(cmd)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    stages: list[psutil.Process] = []
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(poll)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            stages = psutil.Process(proc.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):  # the group is gone already (it ended before `ready()`)
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _, left = psutil.wait_procs(stages, timeout=linger)
        for p in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    assert not left, f"stage process(es) {[p.pid for p in left]} still ran {linger:.0f}s after the orchestrator died"
    return proc


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """Full-file data checks are cached by content under $ALIGN_CACHE: keep a test's cache to itself (use it
    where the test plans, not everywhere: the embedded model's converted copy lives in that cache too)."""
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))


def plan_in_process(path: Path, capsys) -> tuple[int, str]:
    """`align plan PATH` through the CLI's main() in this process: (exit code, everything it printed)."""
    from align.cli import main

    rc = main(["plan", str(path)])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


class InProcess(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def align_in_process(*args: str, capsys) -> InProcess:
    """`align ARGS` through the CLI's main() in this process, read as `align()`'s result is. For the commands that
    do not train (`plan`, mostly): a fresh process spends seconds importing torch and transformers each time, and
    the exit codes of a real process are checked elsewhere (test_bad_input.py's subprocess tests)."""
    from align.cli import main

    capsys.readouterr()  # what the test printed before is not this command's
    rc = main(list(args))
    cap = capsys.readouterr()
    return InProcess(rc, cap.out, cap.err)


SHARED_MMLU = ROOT.parent / "shared" / "data" / "mmlu"
MMLU_SUBJECTS = ["abstract_algebra", "college_biology", "computer_security", "high_school_geography", "marketing"]


@pytest.fixture
def mmlu_cwd(tmp_path, monkeypatch) -> Path:
    """Where to run a shipped recipe from so that its `mmlu_shared5` task finds `../shared/data/mmlu`: the project
    root when the shared data sits beside it; elsewhere (a clone without it) a folder whose `../shared/data/mmlu`
    is a tiny stand-in in the release format (5 dev + 2 test rows per subject), made the current folder."""
    if SHARED_MMLU.is_dir():
        return ROOT
    data = tmp_path / "shared" / "data" / "mmlu"
    for split, n in (("dev", 5), ("test", 2)):
        (data / split).mkdir(parents=True)
        for s in MMLU_SUBJECTS:
            rows = [f'"{s} question {i}?",one,two,three,four,{"ABCD"[i % 4]}' for i in range(n)]
            (data / split / f"{s}_{split}.csv").write_text("\n".join(rows) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work
