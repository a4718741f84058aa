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
