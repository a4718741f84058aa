"""PPO checkpoints, written and read by accelerate's ``Accelerator.save_state`` / ``load_state``.

``checkpoint-<step>/`` holds::

    adapter/                  the policy's LoRA adapter (peft ``save_pretrained``), not the frozen base weights
    value.safetensors         the value model
    optimizer.bin             accelerate: the AdamW state of both param groups (policy and value model)
    scaler.pt                 accelerate, fp16 only: the loss scaler
    random_states_<rank>.pkl  accelerate: the python, numpy, torch (and CUDA) RNG states of each process
    custom_checkpoint_0.pkl   accelerate (``register_for_checkpointing``): step, prompt cursor, KL controller,
                              minibatch-shuffle RNG and history
    trainer_state.json        written last: ``{"global_step", "num_processes", "config"}``. A folder without it is
                              incomplete (killed mid-save): nothing resumes from it.

Left alone, accelerate would save each prepared model whole, the policy's base weights included; the pre-hooks that
``attach`` registers write the adapter and the value model under the names above instead, and read them back.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

PPOTrainer = Any  # align.ppo.trainer.PPOTrainer, which imports this module (so it is not imported here)

STATE_FILE = "trainer_state.json"
ADAPTER_DIR = "adapter"
VALUE_FILE = "value.safetensors"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def attach(trainer: PPOTrainer) -> None:
    """Make the trainer's accelerator checkpoint the whole trainer: the adapter and value model (pre-hooks) and the
    trainer's own state (``register_for_checkpointing``). Called once, by ``PPOTrainer.__init__``, after ``prepare``."""
    acc = trainer.accelerator
    if acc.project_configuration.automatic_checkpoint_naming:
        raise ValueError(
            "PPOTrainer names its checkpoints itself: use an Accelerator without automatic_checkpoint_naming"
        )
    acc.register_for_checkpointing(_TrainerState(trainer))
    acc.register_save_state_pre_hook(functools.partial(_save_models, trainer))
    acc.register_load_state_pre_hook(functools.partial(_load_models, trainer))


def save(trainer: PPOTrainer, checkpoint_dir: Path) -> Path:
    """Write ``checkpoint_dir/checkpoint-<step>/``, ``trainer_state.json`` last, and keep the newest
    ``save_total_limit`` checkpoints. Every process must call it."""
    acc = trainer.accelerator
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / f"checkpoint-{trainer.global_step}"
    acc.wait_for_everyone()
    if acc.is_main_process and path.exists():  # left by a run that was killed after this step
        (path / STATE_FILE).unlink(missing_ok=True)  # first: a kill during rmtree must not leave a "complete" folder
        shutil.rmtree(path)
    acc.wait_for_everyone()
    acc.save_state(str(path))
    acc.wait_for_everyone()  # every process has written its random_states_<rank>.pkl
    if acc.is_main_process:
        state = {
            "global_step": trainer.global_step,
            "num_processes": acc.num_processes,
            "config": dataclasses.asdict(trainer.config),
        }
        tmp = path / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path / STATE_FILE)  # last: it marks the checkpoint complete
        _rotate(checkpoint_dir, keep=path, limit=trainer.config.save_total_limit)
    acc.wait_for_everyone()
    return path


def load(trainer: PPOTrainer, path: Path) -> None:
    """Restore what ``save`` wrote, so that training continues as if never stopped. Raises ``ValueError`` for an
    incomplete checkpoint; warns when the run differs from the checkpoint's in a way that changes the results."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{path} is not a complete PPO checkpoint (no {STATE_FILE})")
    if not (path / "custom_checkpoint_0.pkl").is_file():
        raise ValueError(f"{path} was written by an older align (before accelerate's save_state); restart the stage")
    state = json.loads((path / STATE_FILE).read_text())
    config, acc = trainer.config, trainer.accelerator
    for key in ("seed", "batch_size", "mini_batch_size"):
        saved = state.get("config", {}).get(key, getattr(config, key))
        if saved != getattr(config, key):
            warnings.warn(
                f"resuming from {path} with {key}={getattr(config, key)} (checkpoint: {saved}): "
                "the run will not match an uninterrupted one",
                stacklevel=3,
            )
    if state.get("num_processes", acc.num_processes) != acc.num_processes:
        warnings.warn(
            f"{path} was written by {state['num_processes']} process(es), this run has {acc.num_processes}: "
            "the RNG states do not carry over, so sampling will differ from an uninterrupted run",
            stacklevel=3,
        )
    acc.load_state(str(path))


class _TrainerState:
    """What the trainer adds to accelerate's state, in the ``state_dict`` protocol ``register_for_checkpointing``
    wants. The main process writes it; every process reads it (these values agree across processes)."""

    def __init__(self, trainer: PPOTrainer):
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        t = self.trainer
        return {
            "global_step": t.global_step,
            "cursor": t.cursor,
            "history": t.history,
            "kl_controller": {"type": type(t.kl_ctl).__name__, **t.kl_ctl.state_dict()},
            "shuffle_generator": t.shuffle_generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t = self.trainer
        kl_state = dict(state["kl_controller"])
        kl_type = kl_state.pop("type")
        if kl_type != type(t.kl_ctl).__name__:
            warnings.warn(f"the checkpoint used {kl_type}, this run {type(t.kl_ctl).__name__}", stacklevel=2)
        t.kl_ctl.load_state_dict(kl_state)
        t.global_step = int(state["global_step"])
        t.cursor = int(state["cursor"])
        t.history = list(state["history"])
        t.shuffle_generator.set_state(state["shuffle_generator"])


def _ours(trainer: PPOTrainer, model: Any) -> bool:
    acc = trainer.accelerator
    return any(acc.unwrap_model(model) is acc.unwrap_model(m) for m in (trainer.policy, trainer.value_model))


def _save_models(trainer: PPOTrainer, models: list, weights: list, output_dir: str) -> None:
    """Save pre-hook: write the adapter and the value model, and drop their full state dicts from ``weights``."""
    from safetensors.torch import save_model

    acc = trainer.accelerator
    if acc.is_main_process:
        # save_embedding_layers=False: only the adapter (the base embeddings never change here); "auto" may also copy
        # the whole embedding matrix or look the base model up on the Hub.
        policy = acc.unwrap_model(trainer.policy)
        policy.save_pretrained(Path(output_dir) / ADAPTER_DIR, safe_serialization=True, save_embedding_layers=False)
        save_model(acc.unwrap_model(trainer.value_model), str(Path(output_dir) / VALUE_FILE))
    for i in reversed(range(len(models))):  # weights[i] is models[i]'s state dict
        if _ours(trainer, models[i]):
            del weights[i]


def _load_models(trainer: PPOTrainer, models: list, input_dir: str) -> None:
    """Load pre-hook: read the adapter and the value model, and take them off the list accelerate loads."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file, load_model

    acc = trainer.accelerator
    policy, value = acc.unwrap_model(trainer.policy), acc.unwrap_model(trainer.value_model)
    adapter_file = Path(input_dir) / ADAPTER_DIR / "adapter_model.safetensors"
    result = set_peft_model_state_dict(policy, load_file(str(adapter_file)), adapter_name=policy.active_adapter)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{adapter_file} does not fit the policy's adapter: {result.unexpected_keys[:5]}")
    # read on the CPU, copied onto each parameter's device (safetensors rejects names like "cpu:0")
    missing, unexpected = load_model(value, str(Path(input_dir) / VALUE_FILE))
    if missing or unexpected:
        raise ValueError(f"{VALUE_FILE} does not fit the value model (missing {missing}, extra {unexpected})")
    models[:] = [m for m in models if not _ours(trainer, m)]


def _rotate(checkpoint_dir: Path, keep: Path, limit: int) -> None:
    """Delete the oldest ``checkpoint-N`` folders (complete or not) so that ``limit`` remain, ``keep`` among them."""
    found = sorted(
        (int(m.group(1)), d)
        for d in checkpoint_dir.iterdir()
        if d.is_dir() and (m := CHECKPOINT_RE.match(d.name)) and d != keep
    )
    for _, d in found[: max(0, len(found) - (limit - 1))]:
        shutil.rmtree(d, ignore_errors=True)
