"""Reward, DPO, KTO, ORPO, GRPO and RLOO stages on tiny local models; hand-off links and their plan-time checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import align, align_in_process, alpaca_rows, write_jsonl, write_recipe

from align.cli import main
from align.data import hh_messages, hh_split, preference_row, prompt_of


def pref_rows(n: int = 40) -> list[dict]:
    """Pairs with an easy signal: the chosen reply states a sum, the rejected one spells a word."""
    return [
        {
            "prompt": f"Add {i} and {i + 7}.",
            "chosen": f"The sum of {i} and {i + 7} is {2 * i + 7}.",
            "rejected": "Spell the word apple letter by letter: A-P-P-L-E.",
        }
        for i in range(n)
    ]


def prompt_rows(n: int = 16) -> list[dict]:
    return [{"prompt": f"Convert {i} meters to centimeters."} for i in range(n)]


REWARD_FN = '''
def short_and_sum(prompts, completions, **kw):
    """1 for each completion that says `sum`, minus a length penalty: easy to move on a tiny model."""
    return [float("sum" in c) - 0.01 * len(c) for c in completions]
'''

TRAIN = {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "save_steps": 2, "max_length": 64}
LORA = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
PY = {"mode": "python"}


def chain_recipe(tmp: Path, model: Path, stages: list[dict]) -> dict:
    write_jsonl(tmp / "sft.jsonl", alpaca_rows(24))
    write_jsonl(tmp / "pairs.jsonl", pref_rows())
    write_jsonl(tmp / "prompts.jsonl", prompt_rows())
    (tmp / "rewards.py").write_text(REWARD_FN)
    return {
        "name": "chain",
        "model": str(model),
        "datasets": {
            "sft": {"path": str(tmp / "sft.jsonl")},
            "pairs": {"path": str(tmp / "pairs.jsonl"), "eval_fraction": 0.25},
            "prompts": {"path": str(tmp / "prompts.jsonl")},
        },
        "stages": stages,
    }


SFT = {"name": "sft", "type": "sft", "data": "sft", "adapter": LORA, "train": TRAIN, "launch": PY}
REWARD = {"name": "rm", "type": "reward", "data": "pairs", "adapter": LORA, "train": TRAIN, "launch": PY}
DPO = {"name": "dpo", "type": "dpo", "data": "pairs", "adapter": LORA, "train": {**TRAIN, "beta": 0.1}, "launch": PY}


# ---------------------------------------------------------------- data conversion (no models)


def test_hh_transcripts_split_into_prompt_and_replies() -> None:
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a joke?\n\nAssistant: Sure, here is one."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a joke?\n\nAssistant: No."
    prompt, c, r = hh_split(chosen, rejected)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a joke?\n\nAssistant:"
    assert (c, r) == (" Sure, here is one.", " No.")
    assert hh_messages(prompt) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "a joke?"},
    ]
    # replies that share their first words still split at the last Assistant turn
    assert hh_split(chosen + " A", chosen + " B")[1:] == (" Sure, here is one. A", " Sure, here is one. B")
    row = preference_row({"chosen": chosen, "rejected": rejected}, "hh_rlhf", chat=True)
    assert row["prompt"][-1] == {"role": "user", "content": "a joke?"}
    assert row["chosen"] == [{"role": "assistant", "content": "Sure, here is one."}]
    plain = preference_row({"chosen": chosen, "rejected": rejected}, "hh_rlhf", chat=False)
    assert plain == {"prompt": prompt, "chosen": c, "rejected": r}


def test_message_pairs_with_implicit_prompt_and_prompts_of_every_format() -> None:
    u = {"role": "user", "content": "q"}
    row = {
        "chosen": [u, {"role": "assistant", "content": "good"}],
        "rejected": [u, {"role": "assistant", "content": "bad"}],
    }
    out = preference_row(row, "preference", chat=True)
    assert out["prompt"] == [u] and out["rejected"] == [{"role": "assistant", "content": "bad"}]
    assert prompt_of({"prompt": "q"}, "prompt", chat=True) == [u]
    assert prompt_of({"prompt": "q"}, "prompt", chat=False) == "q"
    assert prompt_of({"messages": [u, {"role": "assistant", "content": "a"}]}, "messages", chat=True) == [u]
    assert prompt_of({"instruction": "q", "output": "a"}, "alpaca", chat=True) == [u]


# ---------------------------------------------------------------- plan-time links (no training)


@pytest.mark.parametrize(
    ("stages", "field", "message"),
    [
        ([SFT, {"name": "ppo", "type": "ppo", "data": "prompts"}], "stages[1](ppo).reward", "needs a reward"),
        ([SFT, {"name": "g", "type": "grpo", "data": "prompts"}], "stages[1](g).reward", "add a `type: reward` stage"),
        (
            [SFT, {"name": "ppo", "type": "ppo", "data": "prompts", "reward": "sft"}],
            "stages[1](ppo).reward",
            "is a `sft` stage",
        ),
        ([SFT, REWARD, {**DPO, "from": "rm"}], "stages[2](dpo).from", "not a policy model"),
        ([SFT, {**DPO, "data": "sft"}], "datasets.sft", "a `dpo` stage takes preference, hh_rlhf data, not `alpaca`"),
        (
            [SFT, {**REWARD, "data": "prompts"}],
            "datasets.prompts",
            "a `reward` stage takes preference, hh_rlhf data, not `prompt` (columns preference: chosen, rejected",
        ),
        (
            [SFT, REWARD, {"name": "ppo", "type": "ppo", "data": "prompts", "adapter": {"type": "full"}}],
            "stages[2](ppo).adapter.type",
            "lora",
        ),
        (
            [SFT, {"name": "g", "type": "grpo", "data": "prompts", "reward": "nomodule:fn"}],
            "stages[1](g).reward",
            "module `nomodule` not found",
        ),
        (
            [SFT, {"name": "g", "type": "rloo", "data": "prompts", "reward": "bad form:"}],
            "stages[1](g).reward",
            "module:function",
        ),
        ([SFT, {**DPO, "train": {"betta": 0.1}}], "stages[1](dpo).train.betta", "did you mean `beta`"),
        (
            [SFT, REWARD, {"name": "e", "type": "eval", "targets": ["rm"], "tasks": [{"data": "sft"}]}],
            "stages[2](e).targets",
            "not a policy",
        ),
    ],
)
def test_bad_links_rejected_by_plan(tmp_path, tiny_llama, capsys, stages, field, message) -> None:
    path = write_recipe(tmp_path, chain_recipe(tmp_path, tiny_llama, stages))
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert field in err and message in err, err


def test_ppo_rejects_reward_model_with_another_tokenizer(tmp_path, tiny_llama, tiny_gpt2, capsys) -> None:
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    other = tmp_path / "other-rm"
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    tok.add_tokens(["<extra_token>"])  # a different vocabulary
    GPT2ForSequenceClassification(
        GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, num_labels=1)
    ).save_pretrained(other)
    tok.save_pretrained(other)
    stages = [SFT, {"name": "ppo", "type": "ppo", "data": "prompts", "reward": str(other)}]
    assert main(["plan", str(write_recipe(tmp_path, chain_recipe(tmp_path, tiny_llama, stages)))]) == 2
    err = capsys.readouterr().err
    assert "tokenizer" in err and "stages[1](ppo).reward" in err, err


def test_plan_shows_the_hand_off(tmp_path, tiny_llama, capsys) -> None:
    stages = [SFT, REWARD, DPO, {"name": "ppo", "type": "ppo", "data": "prompts", "from": "sft"}]
    res = align_in_process(
        "plan", str(write_recipe(tmp_path, chain_recipe(tmp_path, tiny_llama, stages))), capsys=capsys
    )
    assert res.returncode == 0, res.stderr
    lines = {ln.split()[1]: ln for ln in res.stdout.splitlines() if ln[:1].isdigit()}
    assert " sft " in lines["rm"] and " sft " in lines["dpo"]  # reward model and DPO start from the SFT output
    assert "sft + reward rm" in lines["ppo"]  # PPO: policy from sft, reward from the last reward stage


# ---------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def chained(rl_chain):
    """The shared tiny chain (conftest.rl_chain): SFT -> reward -> DPO -> PPO -> eval."""
    return rl_chain


def stage_info(tmp: Path, name: str) -> dict:
    return json.loads((tmp / "runs" / "chain" / name / "stage.json").read_text())


def test_reward_stage_trains_and_writes_a_loadable_classifier(chained) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    tmp, _ = chained
    info = stage_info(tmp, "rm")
    assert info["output"]["kind"] == "reward_model"
    m = info["metrics"]
    assert math.isfinite(m["first_loss"]) and m["last_loss"] < m["first_loss"]
    assert m["trainable_tensors_changed"] > 0 and m["eval_pairs"] == 10
    assert m["eval_accuracy"] >= 0.8  # an easy signal, learned in 4 steps
    model = AutoModelForSequenceClassification.from_pretrained(tmp / "runs/chain/rm/model")
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    assert model(torch.tensor([[5, 6, 7]])).logits.shape == (1, 1)
    assert json.loads((tmp / "runs/chain/rm/inputs.json").read_text())["sft"]["output_sha256"]


def test_dpo_stage_trains_on_the_sft_policy(chained) -> None:
    tmp, _ = chained
    info = stage_info(tmp, "dpo")
    m = info["metrics"]
    assert math.isfinite(m["first_loss"]) and m["trainable_tensors_changed"] > 0
    assert m["eval_reward_accuracies"] > m["eval_reward_accuracies_before"]
    assert m["eval_reward_margins"] > 0
    base = info["output"]["base"]
    assert isinstance(base, dict) and base["kind"] == "adapter"  # the SFT adapter, folded in first when loaded
    ev = stage_info(tmp, "eval")["metrics"]
    assert {"base/sft/perplexity", "sft/sft/perplexity", "dpo/sft/perplexity"} <= set(ev)


def test_chain_second_run_skips_everything(chained) -> None:
    tmp, path = chained
    res = align("run", str(path))
    assert res.returncode == 0
    assert res.stdout.count("done, skipped") == 5, res.stdout


@pytest.mark.parametrize("kind", ["kto", "orpo"])
def test_kto_and_orpo_train(tmp_path, tiny_llama, kind) -> None:
    stage = {**DPO, "name": kind, "type": kind, "train": TRAIN}
    path = write_recipe(tmp_path, chain_recipe(tmp_path, tiny_llama, [stage]))
    res = align("run", str(path))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    m = stage_info(tmp_path, kind)["metrics"]
    assert math.isfinite(m["first_loss"]) and m["trainable_tensors_changed"] > 0 and m["steps"] == 4


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_grpo_and_rloo_with_a_function_reward(tmp_path, tiny_llama, kind) -> None:
    train = {
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "num_generations": 2,
        "max_completion_length": 8,
        "learning_rate": 1e-3,
        "save_steps": 1,
    }
    stage = {
        "name": kind,
        "type": kind,
        "data": "prompts",
        "reward": "rewards:short_and_sum",
        "adapter": LORA,
        "train": train,
        "launch": PY,
    }
    path = write_recipe(tmp_path, chain_recipe(tmp_path, tiny_llama, [stage]))
    res = align("run", str(path))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    info = stage_info(tmp_path, kind)
    assert info["output"]["kind"] == "adapter" and info["metrics"]["steps"] == 2
    assert "reward_first" in info["metrics"]
    cfg = (tmp_path / "runs" / "chain" / kind / "config.yaml").read_text()
    assert "num_generations: 2" in cfg
    # the reward function's source is part of the fingerprint: editing it makes the stage re-run
    (tmp_path / "rewards.py").write_text(REWARD_FN + "\n# edited\n")
    res = align("plan", str(path))
    assert "changed" in res.stdout, res.stdout


# The first logged losses of the tiny chain, pinned (as torchtune pins its recipe losses): a refactor that changes
# what is trained (data order, masking, defaults, the model wrap) shows here, not only a loss that fails to fall.
# Measured with torch 2.13.0 on CPU; regenerate with `pytest tests/test_preference_stages.py -k pinned -s`.
GOLDEN = {
    "sft": [5.70736, 5.692533, 5.671592],
    "rm": [0.687149, 0.660412, 0.63558],
    "dpo": [0.693147, 0.667109, 0.649948],  # ln 2 first: the policy equals its reference
}


def test_first_losses_are_pinned(chained) -> None:
    tmp, _ = chained
    got = {}
    for stage in GOLDEN:
        log = [json.loads(x) for x in (tmp / "runs" / "chain" / stage / "train_log.jsonl").read_text().splitlines()]
        got[stage] = [round(r["loss"], 6) for r in log if "loss" in r][:3]
    print("GOLDEN =", got)
    for stage, want in GOLDEN.items():
        assert want is not None, f"pin {stage}: {got[stage]}"
        assert got[stage] == pytest.approx(want, rel=1e-4), stage
