"""Real 2-process runs (gloo on this CPU): every rank ends with the same weights, artifacts are complete.

Each rank writes the hash of its gathered trainable weights through the ALIGN_RANK_HASH_DIR hook; the test
compares them from outside the stage, and checks the artifacts against a one-process run's file set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import align, alpaca_rows, write_jsonl, write_recipe

TRAIN = {"max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 5e-3, "save_steps": 2, "max_length": 64}
LORA = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
CONFIG = os.environ.get("ALIGN_TEST_MP_CONFIG", "multi_cpu")  # a name or a YAML path


def pairs(n: int = 40) -> list[dict]:
    return [
        {
            "prompt": f"Add {i} and {i + 7}.",
            "chosen": f"The sum of {i} and {i + 7} is {2 * i + 7}.",
            "rejected": "Spell the word apple letter by letter: A-P-P-L-E.",
        }
        for i in range(n)
    ]


def chain(tmp: Path, model: Path) -> Path:
    write_jsonl(tmp / "sft.jsonl", alpaca_rows(32))
    write_jsonl(tmp / "pairs.jsonl", pairs())
    write_jsonl(tmp / "held.jsonl", alpaca_rows(8))
    recipe = {
        "name": "mp",
        "model": str(model),
        "datasets": {
            "sft": {"path": str(tmp / "sft.jsonl"), "eval_fraction": 0.25},
            "pairs": {"path": str(tmp / "pairs.jsonl"), "eval_fraction": 0.25},
            "held": {"path": str(tmp / "held.jsonl")},
        },
        "stages": [
            {"name": "sft", "type": "sft", "data": "sft", "adapter": LORA, "train": TRAIN},
            {"name": "rm", "type": "reward", "data": "pairs", "adapter": LORA, "train": TRAIN},
            {"name": "dpo", "type": "dpo", "data": "pairs", "adapter": LORA, "train": {**TRAIN, "beta": 0.1}},
            {"name": "ppl", "type": "eval", "tasks": [{"type": "perplexity", "data": "held"}]},
        ],
    }
    return write_recipe(tmp, recipe)


def rank_hashes(hook: Path, stage: str) -> list[dict]:
    return [json.loads((hook / f"{stage}.rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("mp")
    path = chain(tmp, tiny_llama)
    hook = tmp / "hashes"
    os.environ["ALIGN_RANK_HASH_DIR"] = str(hook)
    try:
        res = align("run", str(path), "--accelerate-config", CONFIG, "--num-processes", "2", timeout=1200)
    finally:
        del os.environ["ALIGN_RANK_HASH_DIR"]
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    (tmp / "console.txt").write_text(res.stdout + res.stderr)
    return tmp, path, hook


def test_two_process_console_is_one_line_per_step(two_process_run):
    """Under 2 processes the console has each stage's start line and one progress line per logged step (rank 0
    only), no launcher or DDP notices, and no carriage returns (this is not a terminal)."""
    tmp, _, _ = two_process_run
    out = (tmp / "console.txt").read_text()
    assert "\r" not in out
    for noise in ("were not passed to `accelerate launch`", "find_unused_parameters", "FutureWarning", "{'loss'"):
        assert noise not in out, noise
    assert "LOAD REPORT" not in out  # the reward model's new score head is expected, not news
    for stage in ("sft", "rm", "dpo"):
        assert out.count(f"[align] {stage}: ") == 2  # the start line and the done line
        steps = [x for x in out.splitlines() if x.startswith(f"  {stage}  step ")]
        assert [x.split()[2] for x in steps] == [f"{i}/4" for i in range(1, 5)], steps


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_every_rank_ends_with_the_same_weights(two_process_run, stage):
    tmp, _, hook = two_process_run
    r0, r1 = rank_hashes(hook, stage)
    assert (r0["world_size"], r1["world_size"]) == (2, 2)
    assert r0["sha256"] == r1["sha256"] and r0["params"] > 0
    info = json.loads((tmp / "runs" / "mp" / stage / "stage.json").read_text())
    assert info["metrics"]["world_size"] == 2 and info["metrics"]["distributed_type"] == "MULTI_CPU"
    assert info["metrics"]["weights_sha256"] == r0["sha256"]
    assert info["metrics"]["trainable_tensors_changed"] > 0


def test_two_process_artifacts_are_complete_and_load(two_process_run):
    from safetensors.torch import load_file
    from test_pipeline import SFT_FILES, files

    tmp, _, _ = two_process_run
    run = tmp / "runs" / "mp"
    assert files(run / "sft") == SFT_FILES  # the exact file set of a one-process run
    assert files(run / "dpo") == SFT_FILES
    for stage in ("sft", "dpo"):
        names = {p.name for p in (run / stage / "adapter").iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= names
        assert "training_args.bin" not in names
        tensors = load_file(str(run / stage / "adapter" / "adapter_model.safetensors"))
        assert tensors and all(t.numel() > 0 for t in tensors.values())
    m = json.loads((run / "rm" / "stage.json").read_text())["metrics"]
    assert m["eval_accuracy"] is not None and m["eval_accuracy_before"] is not None
    sft = json.loads((run / "sft" / "stage.json").read_text())["metrics"]
    assert sft["eval_loss"] > 0  # the held-out evaluation ran on both ranks (no deadlock)
    ev = json.loads((run / "ppl" / "metrics.json").read_text())["results"]
    assert {r["target"] for r in ev} == {"base", "dpo"}  # the eval stage loaded DPO's adapter chain


def test_two_process_run_skips_when_done(two_process_run):
    _, path, _ = two_process_run
    res = align("run", str(path), "--accelerate-config", CONFIG, "--num-processes", "2")
    assert res.returncode == 0
    assert res.stdout.count("done, skipped") == 4


def test_a_stage_whose_saved_adapter_is_empty_fails_and_stays_resumable(tmp_path, tiny_llama):
    """The ZeRO-3 empty-adapter bug, injected: the stage must fail (exit 1) naming a tensor, write no
    stage.json, keep its checkpoints, and finish on the next run once the save is right."""
    from conftest import sft_recipe

    recipe = sft_recipe(tmp_path, tiny_llama)
    recipe["stages"] = recipe["stages"][:1]  # the SFT stage alone: the eval after it adds nothing here
    path = write_recipe(tmp_path, recipe)
    env = {**os.environ, "ALIGN_FAULT_INJECT": "empty-adapter"}
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "align", "run", str(path)], capture_output=True, text=True, env=env, timeout=600
    )
    run = tmp_path / "runs" / "tiny"
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "empty tensor" in res.stderr and "lora_" in res.stderr
    assert not (run / "sft" / "stage.json").exists()
    assert list((run / ".partial" / "sft" / "checkpoints").glob("checkpoint-*"))
    again = align("run", str(path))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from checkpoint-6" in again.stdout
    assert json.loads((run / "sft" / "stage.json").read_text())["metrics"]["trainable_params"] > 0


def test_verify_saved_names_the_broken_tensor(tmp_path, tiny_llama):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from align.distributed import trainable_state, verify_saved
    from align.errors import StageFailed

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=2, target_modules="all-linear")
    )
    trained = trainable_state(model)
    model.save_pretrained(tmp_path / "a", state_dict=trained)
    n = verify_saved(tmp_path / "a", trained, stage="s", peft_model=model)
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    f = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(f))
    first = sorted(tensors)[0]
    save_file({**tensors, first: torch.zeros(1, 3)}, str(f))
    with pytest.raises(StageFailed, match="shape"):
        verify_saved(tmp_path / "a", trained, stage="s", peft_model=model)
    save_file({k: v for k, v in tensors.items() if k != first}, str(f))
    with pytest.raises(StageFailed, match="lacks the trained tensor"):
        verify_saved(tmp_path / "a", trained, stage="s", peft_model=model)
    save_file({**tensors, first: tensors[first].half()}, str(f))
    with pytest.raises(StageFailed, match="float16"):
        verify_saved(tmp_path / "a", trained, stage="s", peft_model=model)


@pytest.mark.parametrize("config", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_two_processes_save_complete_adapters_that_load(tmp_path, tiny_llama, config):
    """ZeRO-2/3 on CPU (2 gloo processes): SFT with a held-out split, then DPO from its adapter (under ZeRO-3
    the adapter input is folded once on rank 0), then eval loads DPO's adapter chain."""
    pytest.importorskip("deepspeed")
    write_jsonl(tmp_path / "sft.jsonl", alpaca_rows(32))
    write_jsonl(tmp_path / "pairs.jsonl", pairs(24))
    recipe = {
        "name": "ds",
        "model": str(tiny_llama),
        "datasets": {
            "sft": {"path": str(tmp_path / "sft.jsonl"), "eval_fraction": 0.25},
            "pairs": {"path": str(tmp_path / "pairs.jsonl"), "eval_fraction": 0.25},
        },
        "stages": [
            {"name": "sft", "type": "sft", "data": "sft", "adapter": LORA, "train": TRAIN},
            {"name": "dpo", "type": "dpo", "data": "pairs", "adapter": LORA, "train": {**TRAIN, "beta": 0.1}},
            {"name": "ppl", "type": "eval", "tasks": [{"type": "perplexity", "data": "sft"}]},
        ],
    }
    path = write_recipe(tmp_path, recipe)
    hook = tmp_path / "hashes"
    env = {**os.environ, "ALIGN_RANK_HASH_DIR": str(hook)}
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "align", "run", str(path), "--accelerate-config", config, "--num-processes", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    from safetensors.torch import load_file

    run = tmp_path / "runs" / "ds"
    for stage in ("sft", "dpo"):
        r0, r1 = rank_hashes(hook, stage)
        assert r0["sha256"] == r1["sha256"] and r0["world_size"] == 2
        tensors = load_file(str(run / stage / "adapter" / "adapter_model.safetensors"))
        assert len(tensors) == 28 and all(t.numel() > 0 for t in tensors.values())
        m = json.loads((run / stage / "stage.json").read_text())["metrics"]
        assert m["trainable_params"] == sum(t.numel() for t in tensors.values()) > 0
        assert m["trainable_tensors_changed"] == 28 and m["distributed_type"] == "DEEPSPEED"
    assert json.loads((run / "dpo" / "stage.json").read_text())["metrics"]["eval_reward_accuracies"] is not None
    assert (run / "ppl" / "metrics.json").is_file()


def test_ppo_with_two_processes(tmp_path, tiny_llama):
    """align's PPO under DDP (2 gloo processes): both ranks end with the same policy adapter."""
    from test_ppo_stage import PPO
    from test_preference_stages import chain_recipe

    stage = {**PPO, "reward": "rewards:short_and_sum"}
    stage.pop("launch")
    path = write_recipe(tmp_path, chain_recipe(tmp_path, tiny_llama, [stage]))
    hook = tmp_path / "hashes"
    os.environ["ALIGN_RANK_HASH_DIR"] = str(hook)
    try:
        res = align("run", str(path), "--accelerate-config", CONFIG, "--num-processes", "2")
    finally:
        del os.environ["ALIGN_RANK_HASH_DIR"]
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r0, r1 = rank_hashes(hook, "ppo")
    assert r0["sha256"] == r1["sha256"] and r0["world_size"] == 2
    m = json.loads((tmp_path / "runs" / "chain" / "ppo" / "stage.json").read_text())["metrics"]
    assert m["world_size"] == 2 and m["steps"] == 4 and m["weights_sha256"] == r0["sha256"]
    assert m["distributed_type"] == "MULTI_CPU"


def test_six_fresh_two_process_starts_in_a_row(tmp_path, tiny_llama):
    """Rank 0 alone re-creates the partial folder while the others wait: no FileExistsError/FileNotFoundError
    race (it crashed 17 of ~38 fresh starts before: six starts in a row would all pass with it ~3% of the time)."""
    from conftest import sft_recipe

    recipe = sft_recipe(tmp_path, tiny_llama, train={**TRAIN, "max_steps": 1})
    recipe["stages"] = recipe["stages"][:1]
    path = write_recipe(tmp_path, recipe)
    for i in range(6):
        res = align("run", str(path), "--force", "sft", "--accelerate-config", CONFIG, "--num-processes", "2")
        assert res.returncode == 0, f"start {i}: " + res.stderr[-3000:]
        info = json.loads((tmp_path / "runs" / "tiny" / "sft" / "stage.json").read_text())
        assert info["metrics"]["world_size"] == 2


def test_eval_sharded_over_two_processes_equals_one_process(tmp_path, tiny_llama):
    """MMLU-style multiple choice, generation-free perplexity: batches split across 2 ranks, gathered; the
    figures equal a one-process run's (same batches, one summation order). Test questions come three to a
    reading passage, so shared passage segments (run once per cluster) span batches of both ranks."""
    import csv

    from conftest import sft_recipe

    passage = "Passage {k}: the numbers below were written on the board by student {k} in the morning, " * 2
    for split, n in (("test", 10), ("dev", 2)):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        with (tmp_path / "mmlu" / split / f"toy_{split}.csv").open("w", newline="") as fh:
            csv.writer(fh).writerows(
                [
                    [
                        passage.format(k=i // 3) * (split == "test") + f"What is {i} + 1?",
                        *map(str, range(i, i + 4)),
                        "B",
                    ]
                    for i in range(n)
                ]
            )
    task = tmp_path / "toy_mmlu.yaml"
    task.write_text(
        f"name: toy_mmlu\nversion: 1\ntype: mmlu\ndata: {{path: {tmp_path / 'mmlu'}, format: mmlu_csv}}\n"
        "mmlu: {num_fewshot: 2}\nbatch_size: 2\n"
    )
    from transformers import AutoTokenizer

    from align.evaluation import mmlu, multiple_choice

    reqs = mmlu.mmlu_requests(mmlu.load_mmlu(tmp_path / "mmlu"), 2)
    enc = multiple_choice.encode_pairs(
        AutoTokenizer.from_pretrained(tiny_llama), [r.context for r in reqs], [r.continuations for r in reqs]
    )
    clusters = multiple_choice._plan_clusters(multiple_choice._plan_rows(enc)[1])
    # passages 0-2 hold three questions, passage 3 one; the tiny tokenizer splits " A", so each choice is a row
    assert sorted(map(len, clusters)) == [4, 12, 12, 12]
    recipe = sft_recipe(tmp_path, tiny_llama)
    tasks = [{"task": str(task)}, {"data": "train", "max_samples": 20}]
    two = {"mode": "accelerate", "accelerate_config": CONFIG, "num_processes": 2}
    recipe["stages"] = [
        {"name": "one", "type": "eval", "tasks": tasks, "batch_size": 2},
        {"name": "two", "type": "eval", "tasks": tasks, "batch_size": 2, "launch": two},
    ]
    res = align("run", str(write_recipe(tmp_path, recipe)))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"

    def values(stage: str) -> dict:
        m = json.loads((run / stage / "metrics.json").read_text())["results"]
        return {(r["task"], r["metric"]): (r["value"], r["n"]) for r in m}

    one, two_ = values("one"), values("two")
    assert json.loads((run / "two" / "metrics.json").read_text())["processes"] == 2
    assert one.keys() == two_.keys() and len(one) == 3
    for k in one:
        assert one[k][1] == two_[k][1]
        assert one[k][0] == pytest.approx(two_[k][0], rel=1e-9, abs=1e-9), k


def test_kto_orpo_grpo_with_two_processes(tmp_path, tiny_llama):
    """The other TRL stages under 2 processes: each ends with one set of weights on both ranks."""
    from test_preference_stages import DPO, LORA, chain_recipe

    grpo_train = {
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 8,
        "learning_rate": 1e-3,
        "save_steps": 1,
    }
    stages = [
        {**DPO, "name": "kto", "type": "kto", "train": TRAIN},
        {**DPO, "name": "orpo", "type": "orpo", "train": TRAIN},
        {"name": "grpo", "type": "grpo", "data": "prompts", "reward": "rewards:short_and_sum", "adapter": LORA},
    ]
    stages[2]["train"] = grpo_train
    for st in stages:
        st.pop("launch", None)
    path = write_recipe(tmp_path, chain_recipe(tmp_path, tiny_llama, stages))
    hook = tmp_path / "hashes"
    os.environ["ALIGN_RANK_HASH_DIR"] = str(hook)
    try:
        res = align("run", str(path), "--accelerate-config", CONFIG, "--num-processes", "2", timeout=900)
    finally:
        del os.environ["ALIGN_RANK_HASH_DIR"]
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for stage in ("kto", "orpo", "grpo"):
        r0, r1 = rank_hashes(hook, stage)
        assert r0["sha256"] == r1["sha256"] and r0["world_size"] == 2, stage


@pytest.mark.slow
def test_two_nodes_of_one_process_on_loopback(tmp_path, tiny_llama):
    """multi_node (DeepSpeed ZeRO-3) with two "machines" on this one: `align run` on each with MACHINE_RANK and
    MAIN_PROCESS_IP set, a shared run folder; node 0 finalizes, node 1 waits for it."""
    pytest.importorskip("deepspeed")
    import subprocess
    import sys

    from conftest import sft_recipe

    from align.launch import free_port

    path = write_recipe(tmp_path, sft_recipe(tmp_path, tiny_llama))
    port = str(free_port())
    procs = []
    for node in (0, 1):
        env = {
            **os.environ,
            "MACHINE_RANK": str(node),
            "MAIN_PROCESS_IP": "127.0.0.1",
            "MAIN_PROCESS_PORT": port,
            "NUM_MACHINES": "2",
        }
        cmd = [
            sys.executable,
            "-m",
            "align",
            "run",
            str(path),
            "--accelerate-config",
            "multi_node",
            "--num-processes",
            "2",
        ]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    m = json.loads((tmp_path / "runs" / "tiny" / "sft" / "stage.json").read_text())["metrics"]
    assert m["world_size"] == 2 and m["distributed_type"] == "DEEPSPEED" and m["trainable_params"] > 0
    assert (tmp_path / "runs" / "tiny" / "ppl" / "metrics.json").is_file()
