"""PPO end to end on a tiny llama built here: it learns a programmatic reward, resumes exactly, rejects bad input."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from align.ppo import PPOConfig, PPOTrainer, ValueModel

WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "in", "big", "small", "red", "blue"]
WORDS += ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
WORDS += ["yes", "no", "up", "down", "left", "right", "hot", "cold"]
WORDS += ["fast", "slow", "good", "bad", "old", "new", "sun", "moon"]
GOOD = ["yes", "good", "up", "hot", "sun"]  # 5 of the 42 tokens
# LoRA on every linear layer *including lm_head*: a randomly initialised model with initializer_range 0.02 has tiny
# lm_head rows, and behind the final RMSNorm the other layers alone cannot move the next-token distribution much.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<bos>", "<eos>"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(specials + WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def llama_config(tok, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        **kw,
    )


def tiny_models(tok):
    """A seeded tiny llama with a fresh LoRA adapter, and a value model on a separate copy of the same base."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(tok))
    value = ValueModel.from_causal_lm(copy.deepcopy(base))
    policy = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    return policy, value


def prompts(n: int = 32) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 6, (n,), generator=g).tolist()
    return [torch.randint(4, 4 + len(WORDS), (k,), generator=g).tolist() for k in lengths]


def good_fraction(tok):
    good = set(tok.convert_tokens_to_ids(GOOD))

    def reward_fn(prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> torch.Tensor:
        return torch.tensor([sum(t in good for t in c) / len(c) for c in completion_ids])

    return reward_fn


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run several times faster on one thread than on two contended ones (and results do not change)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cpu():
    """The thresholds and the exact-resume check were measured on CPU; keep these runs there even on a GPU box."""
    from accelerate import Accelerator

    return Accelerator(cpu=True)


# ---------------------------------------------------------------- learning


def test_ppo_learns_a_programmatic_reward():
    """Reward = share of completion tokens among 5 "good" words (5/42 = 0.12 for the near-uniform initial policy).

    With beta = 0.05 the KL-regularised optimum boosts each good token by exp((1/8) / 0.05) = 12x per position, i.e.
    a reward of about 5*12 / (5*12 + 37) = 0.62 at a per-sequence KL of a few nats. PPOConfig seeds 0..15 went from
    0.12..0.18 (mean over the first 5 of 40 steps) to 0.52..0.68 (last 5), smallest gain 0.38, per-step KL at most
    10 nats. (With batch_size=8 / mini_batch_size=4 the smallest gain was 0.22: too close to the bar.)
    """
    tok = word_tokenizer()
    policy, value = tiny_models(tok)
    logged: list[dict] = []
    config = PPOConfig(
        learning_rate=3e-3,
        max_steps=40,
        batch_size=16,
        mini_batch_size=8,
        ppo_epochs=4,
        max_new_tokens=8,
        kl_coef=0.05,
        seed=0,
    )
    trainer = PPOTrainer(
        config, policy, value, tok, prompts(), good_fraction(tok), accelerator=cpu(), log_fn=logged.append
    )
    summary = trainer.train()

    assert summary["steps"] == 40 and len(summary["history"]) == 40 and len(logged) == 40
    keys = {"step", "reward_mean", "reward_std", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "policy_loss"}
    keys |= {"value_loss", "vf_clipfrac", "response_length", "seconds"}
    assert keys <= set(logged[0])
    assert [row["step"] for row in logged] == list(range(1, 41))
    first, last = summary["first_reward_mean"], summary["last_reward_mean"]
    assert first < 0.25, summary
    assert last > 0.4 and last - first > 0.25, (first, last)
    kls = [row["kl"] for row in summary["history"]]
    assert all(math.isfinite(k) for k in kls)
    assert max(kls) < 20.0, kls  # nats per sequence of at most 8 tokens
    assert summary["last_kl"] > summary["first_kl"]  # the policy did move away from the reference
    assert logged[0]["ratio_mean"] == pytest.approx(1.0, abs=0.1)
    assert summary["interrupted"] is False


# ---------------------------------------------------------------- checkpoints


def small_config(**kw) -> PPOConfig:
    base = {
        "learning_rate": 3e-3,
        "max_steps": 4,
        "batch_size": 4,
        "mini_batch_size": 2,
        "ppo_epochs": 2,
        "max_new_tokens": 6,
        "adaptive_kl": True,  # its state must survive the resume too
        "kl_horizon": 50,
        "target_kl": 0.5,
        "save_steps": 1,
        "save_total_limit": 2,
        "seed": 3,
    }
    return PPOConfig(**{**base, **kw})


def adapter_weights(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    return {k: v.detach().clone() for k, v in policy.named_parameters() if v.requires_grad}


def test_resume_matches_an_uninterrupted_run(tmp_path: Path):
    tok = word_tokenizer()
    reward = good_fraction(tok)

    straight = PPOTrainer(small_config(), *tiny_models(tok), tok, prompts(6), reward, accelerator=cpu())
    full = straight.train()
    expected = adapter_weights(straight)
    expected_value = straight.accelerator.unwrap_model(straight.value_model).state_dict()

    ckpt = tmp_path / "ckpt"
    first = PPOTrainer(small_config(), *tiny_models(tok), tok, prompts(6), reward, accelerator=cpu())
    part = first.train(checkpoint_dir=ckpt, should_stop=lambda: first.global_step >= 2)
    assert part["interrupted"] is True and part["steps"] == 2
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    c2 = ckpt / "checkpoint-2"
    for name in ("adapter/adapter_model.safetensors", "value.safetensors", "optimizer.bin", "trainer_state.json"):
        assert (c2 / name).is_file(), name
    assert json.loads((c2 / "trainer_state.json").read_text())["global_step"] == 2

    resumed = PPOTrainer(small_config(), *tiny_models(tok), tok, prompts(6), reward, accelerator=cpu())
    summary = resumed.train(checkpoint_dir=ckpt, resume_from=c2)
    assert summary["steps"] == 4 and summary["interrupted"] is False
    assert [r["step"] for r in summary["history"]] == [1, 2, 3, 4]
    # save_total_limit=2 keeps the newest two
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint-3", "checkpoint-4"]

    # Bit-exact: weights, optimizer moments, RNG states, prompt cursor and KL coefficient are all restored, and the
    # CPU computation is deterministic.
    got = adapter_weights(resumed)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    for k, v in resumed.accelerator.unwrap_model(resumed.value_model).state_dict().items():
        assert torch.equal(v, expected_value[k]), k
    for a, b in zip(full["history"], summary["history"], strict=True):
        assert (a["reward_mean"], a["kl"], a["kl_coef"]) == (b["reward_mean"], b["kl"], b["kl_coef"])
    assert resumed.kl_ctl.value == straight.kl_ctl.value
    assert straight.kl_ctl.value != pytest.approx(small_config().kl_coef)  # the adaptive controller did move


def test_resume_needs_a_complete_checkpoint(tmp_path: Path):
    tok = word_tokenizer()
    trainer = PPOTrainer(small_config(), *tiny_models(tok), tok, prompts(6), good_fraction(tok), accelerator=cpu())
    (tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(ValueError, match="trainer_state.json"):
        trainer.train(resume_from=tmp_path / "checkpoint-1")


# ---------------------------------------------------------------- bad input


def test_a_policy_without_lora_adapter_is_rejected():
    from transformers import LlamaForCausalLM

    tok = word_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(tok))
    value = ValueModel.from_causal_lm(copy.deepcopy(base))
    with pytest.raises(ValueError, match="LoRA adapter"):
        PPOTrainer(small_config(), base, value, tok, prompts(4), good_fraction(tok))


def test_a_nan_score_aborts_naming_the_step():
    tok = word_tokenizer()
    trainer = PPOTrainer(
        small_config(), *tiny_models(tok), tok, prompts(4), lambda p, c: [float("nan")] * len(c), accelerator=cpu()
    )
    with pytest.raises(FloatingPointError, match="step 1"):
        trainer.train()


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"batch_size": 6, "mini_batch_size": 4}, "batch_size"),
        ({"cliprange": 0.0}, "cliprange"),
        ({"max_steps": 0}, "max_steps"),
        ({"top_p": 1.5}, "top_p"),
        ({"lam": -0.1}, "lam"),
    ],
)
def test_config_validation_names_the_field(kw: dict, field: str):
    with pytest.raises(ValueError, match=field):
        PPOConfig(**kw)


def test_config_field_types_are_real_types():
    """Recipe checks read `dataclasses.fields(PPOConfig)[i].type`; postponed annotations must not leave strings."""
    types = {f.name: f.type for f in dataclasses.fields(PPOConfig)}
    assert types["learning_rate"] is float and types["max_steps"] is int and types["adaptive_kl"] is bool
    assert types["value_learning_rate"] == (float | None)


# ---------------------------------------------------------------- value model


def test_value_model_from_reward_model_reuses_its_head():
    from transformers import LlamaForSequenceClassification

    tok = word_tokenizer()
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(llama_config(tok, num_labels=1)).eval()
    with torch.no_grad():
        rm.score.weight.normal_()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        scores = rm(input_ids=ids).logits[:, 0]
    value = ValueModel.from_sequence_classifier(rm)
    assert value.head is rm.score
    with torch.no_grad():
        values = value(ids, torch.ones_like(ids))
    assert values.shape == (2, 4)
    # the value at the last token is the reward model's score of the whole sequence
    torch.testing.assert_close(values[:, -1], scores.float())


def test_value_model_from_causal_lm_starts_at_zero():
    from transformers import LlamaForCausalLM

    tok = word_tokenizer()
    value = ValueModel.from_causal_lm(LlamaForCausalLM(llama_config(tok)))
    ids = torch.tensor([[5, 6, 7]])
    assert value(ids, torch.ones_like(ids)).tolist() == [[0.0, 0.0, 0.0]]
