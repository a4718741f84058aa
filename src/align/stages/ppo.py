"""PPO stage: align's own actor-critic PPO (`align.ppo`), since TRL 1.x ships no PPO trainer.

config -> data -> model -> trainer -> train -> save -> metrics (its own `run`: the loop is not a TRL trainer).

Policy: the previous policy stage's output (an SFT adapter folded in) with a new LoRA adapter; the frozen
reference is the same weights with the adapter disabled. Reward: the last reward stage's classifier (or
`reward:` a stage, a reward model folder, or `module:function`). Value model: a copy of the reward model
whose score head, applied to every token, gives the values (InstructGPT); with a function reward it starts
from the policy's backbone with a zero head. Runs under `accelerate launch` like every stage (DDP only).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from align import distributed, tracking
from align.console import ProgressLine, orchestrated, verbose
from align.data import to_prompts
from align.errors import RecipeError
from align.memory import StageMemoryInput, Workload
from align.models import peft_config, plan_tokenizer
from align.ppo import PPOConfig
from align.rundir import Plan, StagePlan, input_artifact, latest_checkpoint, write_common, write_metrics
from align.stages._train import (
    Guard,
    check_chat_template,
    check_data,
    device_args,
    disk_full_is_said,
    load_pairs,
    load_policy,
    save_policy,
    set_pad,
)
from align.stages.base import Default, Problem, Record, apply_defaults
from align.stages.online import (
    OnlineRL,
    OnlineSpec,
    check_reward,
    load_function,
    load_reward_model,
    reward_is_function,
    reward_record,
)
from align.trl_compat import check_trainer_args, coerce_trainer_args

MAX_PROMPT_TOKENS = 512  # longer prompts are skipped (counted in metrics.json)


class PPOSpec(OnlineSpec):
    type: Literal["ppo"]
    train: dict[str, Any] = Field(default_factory=dict, description="align.ppo.PPOConfig fields")


class PPO(OnlineRL):
    name = "ppo"
    spec = PPOSpec
    trainer_config = PPOConfig
    memory = Workload(generates=True, value_model=True, shardable=False)
    defaults = (
        Default("learning_rate", 1e-4, "PPOConfig's 1e-5 suits full weights; a LoRA policy wants more"),
        Default("value_learning_rate", 1e-5, "the value model is a full copy of the reward model: full-weight rate"),
    )

    def check_args(self, spec: PPOSpec, where: str) -> list[Problem]:
        problems = check_trainer_args(spec.train, PPOConfig, f"{where}.train")
        if spec.adapter.type not in ("lora", "dora"):
            problems.append(
                (
                    f"{where}.adapter.type",
                    "ppo trains a `lora` or `dora` adapter on the policy (the reference is the same weights with the "
                    "adapter disabled, so no second copy is held)",
                )
            )
        return problems

    def check(self, plan: Plan, sp: StagePlan) -> list[Problem]:
        formats, problems = check_data(plan, sp, self.formats)
        problems += check_chat_template(plan, sp, list(formats))
        problems += check_reward(plan, sp, same_tokenizer=True)
        try:
            cfg = config(plan, sp)
        except (ValueError, TypeError) as e:
            text = str(e).splitlines()[0]
            field = re.match(r"PPOConfig\.(\w+)", text)  # PPOConfig's checks name the field first
            where = f"{sp.where}.train" + (f".{field.group(1)}" if field else "")
            problems.append((where, text.replace("PPOConfig.", "train.")))
        else:
            problems += tracking.check(cfg.report_to, f"{sp.where}.train.report_to", ppo=True)
        return problems

    def resolved_config(self, plan: Plan, sp: StagePlan) -> dict[str, Any]:
        return {
            **dataclasses.asdict(config(plan, sp)),
            "device": device_args(plan.recipe.seed, plan.recipe.model.dtype),
            **reward_record(plan, sp),
        }

    def batch(self, plan: Plan, sp: StagePlan) -> tuple[int, int]:
        try:
            return config(plan, sp).batch_size, 1  # prompts per rollout step per process
        except (ValueError, TypeError):  # `check` reports the bad value; the launch is checked with the default
            return PPOConfig.batch_size, 1

    def launch_problems(self, info: Any, where: str) -> list[Problem]:
        if info.distributed_type not in ("DEEPSPEED", "FSDP"):
            return []
        return [
            (
                f"{where}.launch.accelerate_config",
                "align's PPO runs under DDP only: it holds policy, value and reward models unsharded and "
                "steps two optimizers, which accelerate's DeepSpeed/FSDP wrap does not take; use multi_gpu "
                "(or multi_cpu), or a `grpo`/`rloo` stage (TRL) under DeepSpeed",
            )
        ]

    def memory_input(self, plan: Plan, sp: StagePlan, common: dict[str, Any]) -> StageMemoryInput:
        cfg = config(plan, sp)
        return StageMemoryInput(
            self.memory,
            **common,
            seq_len=MAX_PROMPT_TOKENS,
            gen_tokens=cfg.max_new_tokens,
            reward_model=not reward_is_function(sp),
        )

    def run(self, plan: Plan, sp: StagePlan, out: Path) -> Record | None:
        return run(plan, sp, out)


def config(plan: Plan, sp: StagePlan) -> PPOConfig:
    args = {
        "seed": plan.recipe.seed,
        **apply_defaults(PPO.defaults, sp.stage.adapter.type),
        **coerce_trainer_args(sp.stage.train, PPOConfig),
    }
    return PPOConfig(**args)


def encode_prompts(ds: Any, tokenizer: Any) -> tuple[list[list[int]], int]:
    ids, skipped = [], 0
    for p in ds["prompt"]:
        if isinstance(p, list):
            enc = tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
        else:
            enc = tokenizer(p, add_special_tokens=True)["input_ids"]
        enc = list(enc["input_ids"] if isinstance(enc, dict) else enc)
        if len(enc) > MAX_PROMPT_TOKENS:
            skipped += 1
            continue
        ids.append(enc)
    return ids, skipped


def model_reward(classifier: Any, pad_id: int) -> Any:
    """Score prompt + completion token ids with the reward classifier (same tokenizer, checked at plan time)."""
    import torch

    @torch.no_grad()
    def score(prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> Any:
        seqs = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
        width = max(len(s) for s in seqs)
        device = next(classifier.parameters()).device
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        out = classifier(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0]
        return out.float().cpu()

    return score


def function_reward(fn: Any, tokenizer: Any) -> Any:
    """Call a `module:function` reward as TRL does: keyword `prompts` and `completions` (decoded text)."""
    import torch

    def score(prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> Any:
        prompts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=False)
        completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return torch.tensor([float(x) for x in fn(prompts=prompts, completions=completions)])

    return score


def run(plan: Plan, sp: StagePlan, out: Path) -> Record | None:
    import torch
    from accelerate import Accelerator
    from peft import get_peft_model

    from align.ppo import PPOTrainer, ValueModel

    stage = sp.stage
    # config
    cfg = config(plan, sp)
    write_common(
        sp, plan, out, {"stage": stage.model_dump(mode="json", by_alias=True), "train_args": dataclasses.asdict(cfg)}
    )
    source = input_artifact(plan, sp.inputs[0])
    tokenizer = plan_tokenizer(plan)
    chat = bool(tokenizer.chat_template)
    trackers = tracking.ppo_trackers(plan.run_dir, stage.name, cfg.report_to)
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=trackers)
    # the adapter's initial weights and anything else drawn before the trainer seeds its sampling: the same seed
    # on every rank, so a recipe and seed give the same PPO weights, killed or not
    set_seed(cfg.seed)
    if trackers:
        accelerator.init_trackers(stage.name, config=tracking.scalars(dataclasses.asdict(cfg)))
    if accelerator.distributed_type.value in ("DEEPSPEED", "FSDP"):
        raise RecipeError(
            f"align's PPO runs under DDP only (it holds policy, value and reward models unsharded), not "
            f"{accelerator.distributed_type.value}; launch it with `multi_gpu` (or `multi_cpu`)",
            f"stages.{stage.name}.launch.accelerate_config",
        )

    # data
    prompts_ds, _ = load_pairs(plan, stage, PPO.formats, lambda ds, fmt: to_prompts(ds, fmt, chat=chat))
    prompts, skipped = encode_prompts(prompts_ds, tokenizer)
    if not prompts:
        raise RecipeError(f"every prompt is longer than {MAX_PROMPT_TOKENS} tokens", f"stages.{stage.name}.data")

    # models: policy + adapter (reference = adapter disabled), reward, value
    # each model is read from disk once; the value model trains a copy of what it starts from
    policy = load_policy(plan, source, sp.partial_dir)
    set_pad(policy, tokenizer)
    if reward_is_function(sp):
        reward_fn = function_reward(load_function(plan, sp), tokenizer)
        value = ValueModel.from_causal_lm(copy.deepcopy(policy))
    else:
        classifier, _ = load_reward_model(plan, sp)
        value = ValueModel.from_sequence_classifier(copy.deepcopy(classifier))
        classifier.to(accelerator.device)
        reward_fn = model_reward(classifier, tokenizer.pad_token_id)
    policy = get_peft_model(policy, peft_config(stage.adapter))

    # trainer
    guard = Guard(out / "train_log.jsonl", sp.partial_dir)
    line: list[ProgressLine] = []

    def log(record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        guard.check(record, step)
        if accelerator.is_main_process:
            guard.log(record)
            if trackers:
                accelerator.log(tracking.scalars(record), step=step)
            for bar in line:
                bar.update(step, record)

    trainer = PPOTrainer(cfg, policy, value, tokenizer, prompts, reward_fn, accelerator=accelerator, log_fn=log)

    # train
    resume = latest_checkpoint(sp)
    if resume is not None and accelerator.is_main_process:
        guard.truncate(int(resume.name.split("-")[1]))  # the steps after the checkpoint run again, and log again
    if accelerator.is_main_process and not verbose():
        line.append(ProgressLine(stage.name, cfg.max_steps, start_step=int(resume.name.split("-")[1]) if resume else 0))
    if resume is not None and not orchestrated():
        print(f"[align] {stage.name}: resuming from {resume.name}", flush=True)
    with guard.trap_sigint(), disk_full_is_said(sp):
        summary = trainer.train(
            checkpoint_dir=sp.partial_dir / "checkpoints", resume_from=resume, should_stop=guard.should_stop
        )
    for bar in line:
        bar.close()
    if trackers:
        accelerator.end_training()
    if summary.get("interrupted"):
        raise KeyboardInterrupt
    unwrapped = accelerator.unwrap_model(trainer.policy)
    trained = distributed.check_ranks_agree(unwrapped, sp.name, out)

    # save (every rank takes part; the main process writes and verifies)
    output, merged = save_policy(unwrapped, tokenizer, out, source, trained=trained, stage=sp.name, merge=stage.merge)
    if not accelerator.is_main_process:
        return None

    # metrics
    history = summary.get("history", [])
    metrics = {
        "steps": summary["steps"],
        "reward_first": summary["first_reward_mean"],
        "reward_last": summary["last_reward_mean"],
        "kl_first": summary["first_kl"],
        "kl_last": summary["last_kl"],
        "prompts": len(prompts),
        "prompts_skipped_too_long": skipped,
        "resumed_from": resume.name if resume else None,
        "trainable_params": sum(t.numel() for t in trained.values()),
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "peak_memory_bytes": distributed.peak_memory_bytes(),
        "weights_sha256": distributed.state_hash(trained),
        "seconds": sum(h.get("seconds", 0.0) for h in history),
    }
    write_metrics(out, metrics)
    return {"type": "ppo", "output": output, "merged": merged, "metrics": metrics}
