"""Peak GPU memory per device of a stage, estimated from the model's configuration alone (no weights).

Every formula is below and in the README ("Memory plan"); `align plan --gpus N --gpu-memory 80GB` uses them.
Bytes per device, with P parameters, T trainable parameters, b bytes per weight (2 for bf16/fp16, 4 for
fp32), N processes, s tokens per sequence, m sequences per micro batch, h hidden size, L layers, V vocab:

  weights      P*b  (QLoRA: 4-bit linear weights 0.5 B/param + 4-byte absmax per 64 = 0.5625 B/param, the rest
               at b); divided by N under ZeRO-3 / FSDP; 0 with ZeRO-3 parameter offload
  adapter      T*4  (peft keeps LoRA/DoRA weights in fp32); 0 for full fine-tuning (already in weights)
  gradients    T*b for full fine-tuning, T*4 for adapters; divided by N under ZeRO-2/3 and FSDP
  optimizer    AdamW: T*12 (fp32 master + two moments) for 16-bit full fine-tuning, else T*8 (two fp32 moments);
               divided by N under ZeRO-1/2/3 and FSDP; 0 with optimizer offload
  activations  L * s*m*h * 17*b (Korthikanti et al. 2022, 34 bytes/elem at 16 bit, without the attention-score
               term since SDPA/flash attention does not store it); with activation checkpointing only each
               layer's input is kept, L*s*m*h*b, plus one layer recomputed, s*m*h*17*b
  logits       s*m*V*4*2 (fp32 logits for the loss and their gradient); eval: s*m*V*4
  extra models dpo/kto full fine-tuning: the reference P*b (divided by N under ZeRO-3); with an adapter the
               reference is the same weights with the adapter off: 0. ppo: value model P*b + P*b gradients +
               optimizer (as above, on P) + the reward model P*b, and the generation KV cache
               2*L*kv_heads*head_dim*(s + new tokens)*m*b. grpo/rloo: the reward model P*b (/N under ZeRO-3) and the
               KV cache for m*num_generations sequences.
  overhead     1 GiB (CUDA context, NCCL buffers) + 5% of the rest (allocator fragmentation)

dpo/kto/orpo and reward run chosen and rejected together: m is twice the micro batch (a reward model's
"logits" are one score, V = 1). ppo/grpo/rloo train on prompt + completion: s = prompt + new tokens.
The value/reward models are assumed to be the policy's size (InstructGPT's setup; align's PPO initialises the
value model from the reward model).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

GiB = 2**30


def parse_size(text: str | int) -> int:
    """'80GB' (10^9), '80GiB' / '80G' (2^30), '24000MB', '1.5TB', or bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", str(text), re.I)
    if not m:
        raise ValueError(f"`{text}` is not a memory size; write e.g. 80GB, 80GiB or 141G")
    value, unit, suffix = float(m.group(1)), m.group(2).upper(), m.group(3).lower()
    power = "KMGT".index(unit) + 1 if unit else 0
    base = 1000 if suffix == "b" else 1024  # GB is decimal (vendor sheets); GiB and a bare G are binary
    return int(value * base**power)


def human(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    max_position_embeddings: int | None = None
    family: str = "llama"  # llama (q/k/v/o, gate/up/down, RMSNorm) | gpt2 (c_attn/c_proj/c_fc, biases, LayerNorm)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Per-layer linear modules: name -> (in, out)."""
        h, i = self.hidden_size, self.intermediate_size
        if self.family == "gpt2":
            return {"c_attn": (h, 3 * h), "attn.c_proj": (h, h), "c_fc": (h, i), "mlp.c_proj": (i, h)}
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def linear_params(self) -> int:
        per = sum(a * b for a, b in self.linear_shapes().values())
        if self.family == "gpt2":
            per += sum(b for _, b in self.linear_shapes().values())  # biases
        return per * self.num_layers

    @property
    def n_params(self) -> int:
        h, v = self.hidden_size, self.vocab_size
        if self.family == "gpt2":
            other = v * h + (self.max_position_embeddings or 0) * h + self.num_layers * 4 * h + 2 * h
        else:
            other = v * h + self.num_layers * 2 * h + h
        return self.linear_params + other + (0 if self.tie_word_embeddings else v * h)


def model_shape(config: dict[str, Any]) -> ModelShape:
    """From an HF config.json: the llama family (llama, mistral, qwen2, smollm, ...) or gpt2."""
    if config.get("model_type") == "gpt2" or "n_embd" in config:
        h = config["n_embd"]
        return ModelShape(
            vocab_size=config["vocab_size"],
            hidden_size=h,
            intermediate_size=config.get("n_inner") or 4 * h,
            num_layers=config["n_layer"],
            num_heads=config["n_head"],
            num_kv_heads=config["n_head"],
            head_dim=h // config["n_head"],
            tie_word_embeddings=config.get("tie_word_embeddings", True),
            max_position_embeddings=config.get("n_positions"),
            family="gpt2",
        )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in config:
            raise ValueError(f"config.json has no `{key}`; align estimates llama-like and gpt2 models")
    heads = config["num_attention_heads"]
    return ModelShape(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=config.get("max_position_embeddings"),
    )


def read_model_config(path: Path | None, *, kind: str, ref: str) -> tuple[dict[str, Any] | None, str]:
    """(config.json as a dict, where it came from), offline first; (None, why) when nothing is reachable."""
    if path is not None and (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text()), str(path / "config.json")
    if kind == "embedded":
        try:
            return _gguf_config(ref), "the embedded GGUF header"
        except Exception as e:  # noqa: BLE001 - any failure means: cannot estimate
            return None, f"cannot read the embedded model's GGUF header ({type(e).__name__})"
    if kind == "hub":
        import os

        try:
            from huggingface_hub import hf_hub_download, try_to_load_from_cache

            cached = try_to_load_from_cache(ref, "config.json")
            if isinstance(cached, str):
                return json.loads(Path(cached).read_text()), "the hub cache"
            if not os.environ.get("HF_HUB_OFFLINE") and _hub_reachable():
                f = hf_hub_download(ref, "config.json", etag_timeout=5)
                return json.loads(Path(f).read_text()), "the hub (config.json only)"
        except Exception as e:  # noqa: BLE001
            return None, f"no config.json for `{ref}` offline or online ({type(e).__name__})"
    return None, f"no config.json for `{ref}`"


def _hub_reachable() -> bool:
    """One quick TCP connect instead of huggingface_hub's retries (tens of seconds without network)."""
    import os
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
        return True
    except OSError:
        return False


def _gguf_config(ref: str) -> dict[str, Any]:
    from gguf import GGUFReader

    from align.models import _embedded_gguf

    reader = GGUFReader(str(_embedded_gguf(ref)))

    def field(name: str) -> Any:
        f = reader.fields[name]
        return f.parts[f.data[0]].tolist()[0]

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    tokens = reader.fields["tokenizer.ggml.tokens"]
    names = {t.name for t in reader.tensors}
    return {
        "model_type": arch,
        "vocab_size": len(tokens.data),
        "hidden_size": field(f"{arch}.embedding_length"),
        "intermediate_size": field(f"{arch}.feed_forward_length"),
        "num_hidden_layers": field(f"{arch}.block_count"),
        "num_attention_heads": field(f"{arch}.attention.head_count"),
        "num_key_value_heads": field(f"{arch}.attention.head_count_kv"),
        "max_position_embeddings": field(f"{arch}.context_length"),
        "tie_word_embeddings": "output.weight" not in names,
    }


@dataclass(frozen=True)
class Workload:
    """What a stage type runs, as far as memory goes; each stage type declares its own (`Stage.memory`)."""

    training: bool = True
    sequences_per_example: int = 1  # 2: chosen and rejected run together (preference pairs)
    score_head: bool = False  # a one-score head instead of vocabulary logits (reward models)
    reference_when_full: bool = False  # a frozen reference copy, unless an adapter (disabled) serves as one
    generates: bool = False  # trains on prompt + generated tokens; a reward model and a KV cache beside it
    value_model: bool = False  # a trained value model (weights, gradients, AdamW) beside the policy
    shardable: bool = True  # runs under ZeRO/FSDP (align's PPO does not)


@dataclass(frozen=True)
class StageMemoryInput:
    workload: Workload
    adapter: str = "lora"  # lora | dora | qlora | full
    lora_r: int = 16
    target_modules: tuple[str, ...] | str = "all-linear"
    dtype: str = "bfloat16"
    seq_len: int = 1024
    micro_batch: int = 8
    grad_accum: int = 1
    activation_checkpointing: bool = False
    n_gpus: int = 1
    sharding: str = "none"  # none | zero1 | zero2 | zero3 | zero3_offload | fsdp
    gen_tokens: int = 0
    num_generations: int = 1
    reward_model: bool = True


def _bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def trainable(shape: ModelShape, inp: StageMemoryInput) -> int:
    if inp.adapter == "full":
        return shape.n_params
    targets = shape.linear_shapes()
    if inp.target_modules != "all-linear":
        # peft's rule for a list: the module name equals an entry or ends with "." + entry
        targets = {
            k: v
            for k, v in targets.items()
            if any(k == t or k.endswith("." + t) or k.split(".")[-1] == t for t in inp.target_modules)
        }
    per = sum(inp.lora_r * (a + b) + (b if inp.adapter == "dora" else 0) for a, b in targets.values())
    return per * shape.num_layers


def estimate(shape: ModelShape, inp: StageMemoryInput) -> dict[str, int]:
    """Peak bytes per device by component, and `total` (see the module docstring for every formula)."""
    b, n, p = _bytes(inp.dtype), max(inp.n_gpus, 1), shape.n_params
    shard_w = inp.sharding in ("zero3", "fsdp")
    shard_g = inp.sharding in ("zero2", "zero3", "zero3_offload", "fsdp")
    shard_o = shard_g or inp.sharding == "zero1"
    w = inp.workload
    training = w.training
    t = trainable(shape, inp) if training else 0
    full = inp.adapter == "full"
    out: dict[str, int] = {}
    quantized = shape.linear_params * 0.5625 + (p - shape.linear_params) * b  # QLoRA: 4-bit linears
    weights = quantized if inp.adapter == "qlora" else p * b
    out["weights"] = 0 if inp.sharding == "zero3_offload" else int(weights / (n if shard_w else 1))
    out["adapter"] = 0 if full else t * 4
    out["gradients"] = int(t * (b if full else 4) / (n if shard_g else 1))
    opt = t * (12 if full and b == 2 else 8)
    out["optimizer"] = 0 if inp.sharding == "zero3_offload" else int(opt / (n if shard_o else 1))
    seqs = inp.micro_batch * w.sequences_per_example
    # on-policy stages train on prompt + completion
    seq = inp.seq_len + (inp.gen_tokens if w.generates else 0)
    tokens_h = seq * seqs * shape.hidden_size
    if not training:
        out["activations"] = tokens_h * 17 * b  # one layer's worth at a time, nothing kept for backward
    elif inp.activation_checkpointing:
        out["activations"] = shape.num_layers * tokens_h * b + tokens_h * 17 * b
    else:
        out["activations"] = shape.num_layers * tokens_h * 17 * b
    vocab = 1 if w.score_head else shape.vocab_size  # a reward model outputs one score
    out["logits"] = seq * seqs * vocab * 4 * (2 if training else 1)
    kv = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * b
    extra = 0
    if w.reference_when_full and full:
        extra += int(p * b / (n if inp.sharding in ("zero3", "zero3_offload", "fsdp") else 1))
    if w.value_model:
        extra += p * b + p * b + p * (12 if b == 2 else 8)  # value model: weights, gradients, AdamW
    if w.generates:
        extra += int(p * b / (n if shard_w else 1)) if inp.reward_model else 0
        extra += kv * (inp.seq_len + inp.gen_tokens) * inp.micro_batch * inp.num_generations
    out["extra_models"] = extra
    rest = sum(out.values())
    out["overhead"] = GiB + int(0.05 * rest)
    out["total"] = rest + out["overhead"]
    return out


def fixes(shape: ModelShape, inp: StageMemoryInput, gpu_bytes: int) -> list[str]:
    """The cheapest changes that bring the stage under `gpu_bytes`, in order; each one is re-estimated."""

    def ok(x: StageMemoryInput) -> bool:
        return estimate(shape, x)["total"] <= gpu_bytes

    w = inp.workload

    out: list[str] = []
    if inp.sharding in ("zero2", "zero3", "fsdp", "zero3_offload"):
        more = next((g for g in (2, 4, 8, 16, 32, 64) if g > inp.n_gpus and ok(replace(inp, n_gpus=g))), None)
        if more:
            out.append(f"use {more} GPUs (`--gpus {more}`)")
    if inp.sharding != "zero3" and w.shardable and ok(replace(inp, sharding="zero3")):
        out.append("use DeepSpeed ZeRO-3 (`--accelerate-config deepspeed_zero3`)")
    if not inp.activation_checkpointing and ok(replace(inp, activation_checkpointing=True)):
        out.append("turn on activation checkpointing (`train.activation_checkpointing: true`)")
    offloadable = w.shardable and inp.sharding != "zero3_offload" and not out
    if offloadable and ok(replace(inp, sharding="zero3_offload")):
        out.append("offload to CPU memory (`--accelerate-config deepspeed_zero3_offload`)")
    global_ = inp.micro_batch * inp.grad_accum
    for m in (mb for mb in range(inp.micro_batch - 1, 0, -1) if global_ % mb == 0):
        if ok(replace(inp, micro_batch=m)):
            k = global_ // m
            out.append(
                f"micro batch {m} with gradient accumulation {k} (`train.per_device_train_batch_size: {m}`, "
                f"`train.gradient_accumulation_steps: {k}`): same global batch"
            )
            break
    if not out:
        combo = replace(inp, activation_checkpointing=True, micro_batch=1)
        combo = combo if not w.shardable else replace(combo, sharding="zero3")
        offload = replace(combo, sharding="zero3_offload")
        if ok(combo):
            out.append("combine them: ZeRO-3, activation checkpointing and micro batch 1")
        elif w.shardable and ok(offload):
            out.append("combine them: ZeRO-3 with CPU offload, activation checkpointing and micro batch 1")
        else:
            out.append(
                "it does not fit even with ZeRO-3, checkpointing and micro batch 1 "
                f"({human(estimate(shape, combo)['total'])})"
            )
    return out
