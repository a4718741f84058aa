"""What a stage needs to be right under N processes: who is main, barriers, gathered weights, proof on every rank.

A stage that trains must prove on every rank what it claims on rank 0: after training each rank hashes
its (gathered) trainable weights, the hashes are exchanged, and a mismatch fails the stage. Before
stage.json is written the saved adapter/model is read back and compared with the trained weights
(names, shapes, no 0-sized tensor, parameter count, dtype), so ZeRO-3's empty-adapter save cannot pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from align.errors import StageFailed

HASH_DIR_ENV = "ALIGN_RANK_HASH_DIR"  # test hook: each rank writes <stage>.rank<R>.json with its weight hash
FAULT_ENV = "ALIGN_FAULT_INJECT"  # test hook: `empty-adapter` writes 0-sized tensors, as ZeRO-3's bug does


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def state() -> Any:
    """accelerate's process state; initialises torch.distributed (gloo on CPU) when launched with N processes."""
    from accelerate import PartialState

    return PartialState(cpu=_no_cuda()) if world_size() > 1 else None


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


def barrier() -> None:
    if world_size() > 1:
        state().wait_for_everyone()


def all_gather_object(obj: Any) -> list[Any]:
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist

    state()
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (so all ranks fail together instead of hanging)."""
    return any(all_gather_object(bool(flag)))


# ---------------------------------------------------------------- gathered weights


@contextlib.contextmanager
def gathered(params: list[Any]) -> Iterator[None]:
    """Full values of ZeRO-3-partitioned parameters inside the block (a no-op for ordinary parameters)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def numel(p: Any) -> int:
    """A parameter's true size: under ZeRO-3 a partitioned tensor reports 0 elements, its ds_numel is the size."""
    return int(getattr(p, "ds_numel", p.numel()))


def shape(p: Any) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def trainable_state(model: Any) -> dict[str, Any]:
    """{name: full CPU copy} of every trainable parameter, gathered one at a time under ZeRO-3.

    Collective under ZeRO-3 (every rank must call it). Names are the unwrapped model's."""
    fsdp = _fsdp_root(model)
    if fsdp is not None:  # FSDP: the full parameters on every rank for the duration of the copy
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(fsdp, writeback=False, rank0_only=False):
            return {
                n.replace("_fsdp_wrapped_module.", ""): p.detach().to("cpu", copy=True)
                for n, p in fsdp.named_parameters()
                if p.requires_grad
            }
    model = _unwrap(model)
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            with gathered([p]):
                out[name] = p.detach().to("cpu", copy=True)
    return out


def _fsdp_root(model: Any) -> Any:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:
        return None
    return model if isinstance(model, FSDP) else None


def _unwrap(model: Any) -> Any:
    while hasattr(model, "module") and not hasattr(model, "peft_config"):
        model = model.module  # DDP / DeepSpeed engine
    return model


def state_hash(tensors: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(dtype=_byte_dtype()).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _byte_dtype() -> Any:
    import torch

    return torch.uint8


def check_ranks_agree(model: Any, stage: str, out: Path | None = None) -> dict[str, Any]:
    """Every rank hashes its trainable weights; all hashes must be equal. Returns the trained state (CPU).

    Under DDP and ZeRO-1/2 each rank holds a full replica, so a rank that trained other weights (a model that
    was never wrapped, a collective that a rank skipped) shows here. Under ZeRO-3 the gathered values are
    the one sharded copy, so agreement is by construction; the hash is still exchanged."""
    tensors = trainable_state(model)
    digest = state_hash(tensors)
    record = {
        "rank": rank(),
        "world_size": world_size(),
        "sha256": digest,
        "tensors": len(tensors),
        "params": sum(t.numel() for t in tensors.values()),
    }
    if (hook := os.environ.get(HASH_DIR_ENV)) and out is not None:
        Path(hook).mkdir(parents=True, exist_ok=True)
        (Path(hook) / f"{stage}.rank{rank()}.json").write_text(json.dumps(record))
    hashes = all_gather_object(digest)
    if len(set(hashes)) > 1:
        raise StageFailed(
            f"stage `{stage}`: the ranks ended with different trainable weights "
            f"({', '.join(f'rank {i}: {h[:12]}' for i, h in enumerate(hashes))}); nothing was saved as done"
        )
    return tensors


# ---------------------------------------------------------------- the saved artifact, read back


def saved_tensors(folder: Path) -> dict[str, Any]:
    """Every tensor in a folder's safetensors files (adapter or model, sharded or not)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    out: dict[str, Any] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def adapter_keys(model: Any, trained: dict[str, Any]) -> dict[str, Any]:
    """The trained tensors under the names peft writes them (adapter name and `modules_to_save.` dropped)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(_unwrap(model), state_dict=trained)


def verify_saved(
    folder: Path, trained: dict[str, Any], *, stage: str, peft_model: Any = None, dtype: Any = None
) -> int:
    """Compare a saved adapter/model with the trained weights before the stage may be marked done.

    Checks: a safetensors file exists; no 0-sized tensor; every trained (adapter) tensor is present with its
    shape; the saved parameter count equals the trained one; dtypes are the trained dtype (or `dtype` for a
    model saved in another precision). Returns the saved parameter count. Raises StageFailed naming a tensor."""

    adapter = peft_model is not None

    def fail(why: str) -> StageFailed:
        return StageFailed(f"stage `{stage}`: the saved {'adapter' if adapter else 'model'} in {folder} {why}")

    saved = saved_tensors(folder)
    if not saved:
        raise fail("has no safetensors weights")
    empty = [k for k, t in saved.items() if t.numel() == 0]
    if empty:
        raise fail(f"holds {len(empty)} empty tensor(s), e.g. `{empty[0]}` (shape {tuple(saved[empty[0]].shape)})")
    if adapter:
        expected = adapter_keys(peft_model, trained)
        missing = [k for k in expected if k not in saved]
        if missing:
            raise fail(f"lacks the trained tensor `{missing[0]}` ({len(missing)} missing)")
        for k, t in expected.items():
            if tuple(saved[k].shape) != tuple(t.shape):
                raise fail(f"has `{k}` of shape {tuple(saved[k].shape)}, trained {tuple(t.shape)}")
            want = dtype or t.dtype
            if saved[k].dtype != want:
                raise fail(f"has `{k}` in {saved[k].dtype}, trained {want}")
        n_saved = sum(saved[k].numel() for k in expected)
        n_trained = sum(t.numel() for t in expected.values())
        if n_saved != n_trained:
            raise fail(f"holds {n_saved} trainable parameters, trained {n_trained}")
        return n_saved
    # a full model: the trained parameters (all of them) must be there with their shapes
    n_saved = sum(t.numel() for t in saved.values())
    for n, t in trained.items():
        cand = [k for k in (n, n.removeprefix("model."), f"model.{n}") if k in saved]
        if not cand and not _tied(n):
            raise fail(f"lacks the trained tensor `{n}`")
        if cand and tuple(saved[cand[0]].shape) != tuple(t.shape):
            raise fail(f"has `{cand[0]}` of shape {tuple(saved[cand[0]].shape)}, trained {tuple(t.shape)}")
    return n_saved


def empty_safetensors(folder: Path) -> None:
    """Rewrite a folder's safetensors with every tensor 0-sized (the ZeRO-3 + LoRA empty-adapter bug)."""
    import torch
    from safetensors.torch import save_file

    for f in folder.glob("*.safetensors"):
        names = list(saved_tensors(folder))
        save_file({n: torch.empty(0) for n in names}, str(f))


def _tied(name: str) -> bool:
    return name.endswith("lm_head.weight")  # tied to the embeddings: saved once


def peak_memory_bytes() -> int:
    """CUDA max allocated on GPU, the process's peak RSS on CPU."""
    import resource

    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


@contextlib.contextmanager
def no_zero_init() -> Iterator[None]:
    """Load a model whole in this process only (merging, a read-back): without this, transformers loads it
    partitioned under ZeRO-3's zero.Init, which is a collective the other ranks never join."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:
        yield
        return
    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


# ---------------------------------------------------------------- sharded evaluation


def mine(batch_index: int) -> bool:
    """Evaluation is sharded by whole batches (batch b goes to rank b mod world): every batch is computed
    exactly as one process computes it, so the gathered result equals the one-process result."""
    return batch_index % world_size() == rank()


def merge_gathered(part: dict[Any, Any]) -> dict[Any, Any]:
    """Union of every rank's {key: value} results (each key computed by one rank)."""
    out: dict[Any, Any] = {}
    for d in all_gather_object(part):
        out.update(d)
    return out


def device() -> Any:
    """This rank's device: cuda:<local rank> on GPU, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
