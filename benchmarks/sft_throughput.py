"""LoRA SFT throughput: align's SFT stage configuration vs plain TRL ``SFTTrainer`` defaults, side by side.

Both sides train the same model (the embedded SmolLM2-135M-Instruct unless ``--model``), the same LoRA
config (r=16, alpha=32, all-linear, dropout 0.05, built by ``align.models.peft_config``), the same
examples (the first ``--examples`` rows of an Alpaca file, converted once by ``align.data.to_sft`` to
conversational prompt/completion pairs), the same ``per_device_train_batch_size`` and ``max_length``,
for one epoch over those examples, in this one process with the same torch threads.

* **align** uses align's own code path: a ``Recipe``/``SFTSpec`` is built and its trainer arguments come
  from ``align.stages.sft.SFT().train_args`` (the stage type's defaults + the stage's ``train:``), the model from
  ``align.models.load_causal_lm``. With packing (bfd, padding-free) a step holds ``batch_size`` packed
  rows of ``max_length`` tokens, so it takes fewer steps for the same examples.
* **baseline** is ``SFTConfig`` with its defaults, except what must be set to run here and to match:
  ``output_dir``, ``report_to="none"``, ``use_cpu``/``bf16`` as align sets them for this machine,
  ``per_device_train_batch_size``, ``max_length``, ``num_train_epochs=1``.

Throughput counts real (non-padding) input tokens per second of the training loop (model loading and
dataset tokenization/packing are excluded). Each side's first step (warm-up) is excluded from the timed
window; ``*_all_steps`` fields include it. Achieved FLOP/s is model FLOPs (``4 x N x tokens`` for LoRA,
see ``flops_formula``) over a best-of-reps fp32 ``torch.matmul`` peak measured in the same run.

A packed-loss check compares the loss align's trainer computes on a packed, padding-free batch with the
per-example (unpacked) loss of the same examples, and with the loss if packed documents could attend
to each other (what packing without the block-diagonal mask would compute).

Run from the project root (about 8-10 minutes on 2 idle CPU cores at the defaults)::

    .venv/bin/python benchmarks/sft_throughput.py > runs/sft_throughput.json
    .venv/bin/python benchmarks/sft_throughput.py --quick          # smoke test, about a minute

``--align-set key=value`` (repeatable) overrides one of align's trainer arguments (a candidate default);
``--baseline-set`` does the same for the baseline, e.g. to see what one TRL default costs.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[1] / "../shared/data/sft/alpaca_gpt4_en_demo_500.jsonl"
MODEL = "smollm2-135m-instruct"
LORA = {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
SEED = 42


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_ticks() -> tuple[int, int, int]:
    """(all CPU ticks, busy ticks machine-wide, this process's ticks) from /proc; zeros where unavailable."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        busy = sum(fields) - fields[3] - fields[4]  # minus idle and iowait
        return sum(fields), busy, int(mine[11]) + int(mine[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0, 0, 0


def foreign_share(before: tuple[int, int, int], after: tuple[int, int, int]) -> float:
    """Share of the machine's CPU time used by other processes between two cpu_ticks() readings."""
    total = after[0] - before[0]
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / total) if total > 0 else 0.0


def matmul_peak_gflops(n: int = 2048, reps: int = 8) -> float:
    """Best-of-reps fp32 matmul rate with the current torch threads (2 n^3 FLOPs per product)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def parse_sets(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


# ---------------------------------------------------------------- measuring one trainer


class _Counting:
    """Wraps the trainer's collator: real and padded token counts of every batch, in order."""

    def __init__(self, inner: Any):
        self.inner, self.real, self.total = inner, [], []

    def __call__(self, features: Any) -> Any:
        batch = self.inner(features)
        ids = batch["input_ids"]
        if "attention_mask" in batch:
            self.real.append(int(batch["attention_mask"].sum()))
        else:  # padding-free: one flattened row; without pad_to_multiple_of it holds no pad tokens
            self.real.append(int(ids.numel()))
        self.total.append(int(ids.numel()))
        return batch


class Baton:
    """One trainer at a time runs a step; the side further behind in its epoch goes next.

    Both trainers run in threads of this process and move through their epochs at the same pace, so load
    from other processes on the machine falls on both alike. A side's time is the sum of the spans in
    which it held the baton: from the start of one of its steps to the start of its next (compute,
    logging, checkpointing, fetching the next batch), never the time it waited for the other side.
    """

    def __init__(self, names: list[str], interleave: bool):
        import threading

        self.cond = threading.Condition()
        self.order, self.interleave = list(names), interleave
        self.holder: str | None = self.order[0]
        self.progress = dict.fromkeys(names, 0.0)
        self.done: set[str] = set()

    def acquire(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.holder == name)

    def release(self, name: str, progress: float, finished: bool = False) -> None:
        with self.cond:
            self.progress[name] = progress
            if finished:
                self.done.add(name)
            left = [n for n in self.order if n not in self.done]
            if not left:
                self.holder = None
            elif self.interleave:
                self.holder = min(left, key=lambda n: (self.progress[n], self.order.index(n)))
            else:
                self.holder = left[0]
            self.cond.notify_all()


def _timer_callback(name: str, baton: Baton) -> Any:
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        """Per-step spans: start of a step to the start of the next one (or the end of training)."""

        def __init__(self) -> None:
            self.spans: list[float] = []
            self.foreign: list[float] = []
            self.start: float | None = None
            self.ticks = (0, 0, 0)
            self.threads = 0

        def _close(self, state: Any, finished: bool) -> None:
            if self.start is not None:
                self.spans.append(time.perf_counter() - self.start)
                self.foreign.append(foreign_share(self.ticks, cpu_ticks()))
                self.start = None
            baton.release(name, state.global_step / max(state.max_steps, 1), finished)

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            import torch

            if self.start is not None:
                self._close(state, False)
            baton.acquire(name)
            self.threads = torch.get_num_threads()
            self.ticks = cpu_ticks()
            self.start = time.perf_counter()

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._close(state, True)

    return Timer()


def run_sides(trainers: dict[str, Any], interleave: bool) -> dict[str, tuple[Any, _Counting]]:
    """Train each trainer for its epoch, step by step in turn (or one after the other)."""
    import threading

    baton = Baton(list(trainers), interleave)
    timers, counters, errors = {}, {}, {}
    for name, trainer in trainers.items():
        timers[name] = _timer_callback(name, baton)
        trainer.add_callback(timers[name])
        counters[name] = trainer.data_collator = _Counting(trainer.data_collator)

    import torch

    threads_wanted = torch.get_num_threads()

    def work(name: str) -> None:
        torch.set_num_threads(threads_wanted)  # per OS thread under OpenMP: give each side the main thread's
        try:
            trainers[name].train()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the other side is let go
            errors[name] = e
            baton.release(name, 1.0, finished=True)

    threads = [threading.Thread(target=work, args=(n,), name=f"train-{n}") for n in trainers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, err in errors.items():
        raise RuntimeError(f"the {name} side failed: {err!r}") from err
    return {n: (timers[n], counters[n]) for n in trainers}


def summarize(trainer: Any, timer: Any, counter: _Counting, n_params: int) -> dict[str, Any]:
    steps = len(timer.spans)
    if steps < 2:
        raise SystemExit("need at least 2 steps per side (the first is an excluded warm-up); raise --examples")
    ga = trainer.args.gradient_accumulation_steps  # micro-batches per optimizer step (the last may have fewer)
    real = [sum(counter.real[i * ga : (i + 1) * ga]) for i in range(steps)]
    total = [sum(counter.total[i * ga : (i + 1) * ga]) for i in range(steps)]
    tokens, seconds, all_seconds = sum(real[1:]), sum(timer.spans[1:]), sum(timer.spans)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    rates = sorted(r / t for r, t in zip(real[1:], timer.spans[1:], strict=True))
    foreign = sum(f * t for f, t in zip(timer.foreign[1:], timer.spans[1:], strict=True)) / seconds
    a = trainer.args
    return {
        "effective": {
            "activation_checkpointing": a.activation_checkpointing,
            "packing": a.packing,
            "padding_free": getattr(trainer, "padding_free", a.padding_free),
            "attn_implementation": trainer.model.config._attn_implementation,
            "per_device_train_batch_size": a.per_device_train_batch_size,
            "gradient_accumulation_steps": a.gradient_accumulation_steps,
            "logging_steps": a.logging_steps,
            "learning_rate": a.learning_rate,
        },
        "steps": steps,
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "tokens_per_s_median_step": round(rates[len(rates) // 2], 1),
        "padding_fraction": round(1 - sum(real) / sum(total), 4),
        "achieved_gflops": round(4 * n_params * tokens / seconds / 1e9, 2),
        "tokens_per_step": round(sum(real) / steps, 1),
        "epoch_tokens": sum(real),
        "epoch_padded_tokens": sum(total),
        "first_step_s": round(timer.spans[0], 2),
        "seconds_all_steps": round(all_seconds, 2),
        "tokens_per_s_all_steps": round(sum(real) / all_seconds, 1),
        "step_s": [round(x, 2) for x in timer.spans],
        "step_tokens": real,
        # CPU share used by other processes while this side's timed steps ran (0 = none, 1 = all cores)
        "foreign_cpu_share": round(foreign, 3),
        "threads": timer.threads,
        "last_logged_loss": losses[-1] if losses else None,
        "n_params_forward": n_params,
    }


def n_params_forward(model: Any) -> int:
    """Unique parameters (tied embedding / LM head counted once: it is one matmul per token), LoRA included."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


# ---------------------------------------------------------------- the two sides


def align_trainer(model_path: Path, train_ds: Any, opts: argparse.Namespace, work: Path) -> Any:
    """What `align run` builds for an SFT stage: SFT().train_args + load_causal_lm + peft_config."""
    from types import SimpleNamespace

    from align.models import load_causal_lm, load_tokenizer, peft_config
    from align.recipe import Recipe
    from align.stages.sft import SFT
    from align.trl_compat import SFTConfig, SFTTrainer

    train = {
        "per_device_train_batch_size": opts.batch_size,
        "max_length": opts.max_length,
        "num_train_epochs": 1,
        **parse_sets(opts.align_set),
    }
    recipe = Recipe.model_validate(
        {
            "name": "sft-throughput",
            "model": str(model_path),
            "seed": SEED,
            "datasets": {"d": {"path": str(opts.data), "format": "alpaca", "max_samples": opts.examples}},
            "stages": [{"name": "sft", "type": "sft", "data": "d", "adapter": LORA, "train": train}],
        }
    )
    stage = recipe.stages[0]
    args = SFT().train_args(SimpleNamespace(recipe=recipe), SimpleNamespace(stage=stage), work)
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, dtype=recipe.model.dtype)
    if model.generation_config is not None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**args),
        train_dataset=train_ds,
        processing_class=tokenizer,
        peft_config=peft_config(stage.adapter),
    )
    return trainer, args


def baseline_trainer(
    model_path: Path, train_ds: Any, opts: argparse.Namespace, work: Path, device_args: dict[str, Any]
) -> Any:
    """Plain TRL: SFTConfig defaults except what must be set to run here and to match align's run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.models import peft_config
    from align.recipe import AdapterSpec
    from align.trl_compat import SFTConfig, SFTTrainer

    args = {
        "output_dir": str(work / "baseline"),
        "report_to": "none",
        **device_args,
        "seed": SEED,
        "per_device_train_batch_size": opts.batch_size,
        "max_length": opts.max_length,
        "num_train_epochs": 1,
        **parse_sets(opts.baseline_set),
    }
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**args),
        train_dataset=train_ds,
        processing_class=tokenizer,
        peft_config=peft_config(AdapterSpec(**LORA)),
    )
    return trainer, args


# ---------------------------------------------------------------- packed-loss correctness


def packed_loss_check(trainer: Any, max_docs: int = 3) -> dict[str, Any]:
    """Loss of align's trainer on one packed, padding-free row vs the same documents one at a time."""
    import torch

    row = next(r for r in trainer.train_dataset if len(r["seq_lengths"]) >= 2)
    lengths = row["seq_lengths"][:max_docs]
    n = sum(lengths)
    packed = {"input_ids": row["input_ids"][:n], "labels": row["labels"][:n], "seq_lengths": lengths}
    model = trainer.model
    was_training = model.training
    model.eval()  # no LoRA dropout: both sides deterministic
    try:
        with torch.no_grad():
            batch = trainer.data_collator([packed])
            batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss_packed = float(trainer.compute_loss(model, dict(batch)))
            # Reference: each document on its own, summed NLL over its completion tokens.
            nll, count, start = 0.0, 0, 0
            for ln in lengths:
                ids = torch.tensor(row["input_ids"][start : start + ln])[None]
                lab = torch.tensor(row["labels"][start : start + ln])[None]
                out = model(input_ids=ids, labels=lab, use_cache=False)
                k = int((lab[:, 1:] != -100).sum())
                nll += float(out.loss) * k
                count += k
                start += ln
            loss_unpacked = nll / count
            # Wrong on purpose: the same packed row as one causal sequence (documents see each other).
            ids = torch.tensor(packed["input_ids"])[None]
            lab = batch["labels"].cpu()
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=lab, use_cache=False)
            loss_leaky = float(out.loss)
    finally:
        model.train(was_training)
    return {
        "documents": len(lengths),
        "tokens": n,
        "packed_loss": round(loss_packed, 6),
        "unpacked_loss": round(loss_unpacked, 6),
        "abs_diff": abs(loss_packed - loss_unpacked),
        "loss_without_block_mask": round(loss_leaky, 6),
        "ok": abs(loss_packed - loss_unpacked) < 1e-3 * max(1.0, loss_unpacked),
    }


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=MODEL, help="embedded name or a local model folder")
    ap.add_argument("--data", type=Path, default=DATA, help="Alpaca-format JSONL")
    ap.add_argument("--steps", type=int, default=16, help="baseline steps; examples = steps x batch size")
    ap.add_argument("--examples", type=int, default=None, help="examples both sides train on (overrides --steps)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both sides (default: torch's)")
    ap.add_argument("--order", default="baseline,align", help="sides and who starts, e.g. align,baseline")
    ap.add_argument("--sequential", action="store_true", help="run the sides back to back, not step by step")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: 3 baseline steps, max_length 128")
    ap.add_argument("--align-set", action="append", default=[], metavar="KEY=VALUE", help="override an align arg")
    ap.add_argument("--baseline-set", action="append", default=[], metavar="KEY=VALUE", help="override a TRL arg")
    ap.add_argument("--no-loss-check", action="store_true", help="skip the packed-vs-unpacked loss check")
    opts = ap.parse_args()
    if opts.quick:
        opts.steps, opts.max_length, opts.examples = 3, 128, opts.examples or 12
    opts.examples = opts.examples or opts.steps * opts.batch_size
    if not opts.data.is_file():
        print(f"[sft_throughput] data file {opts.data} not found; skipping", file=sys.stderr)
        print(json.dumps({"skipped": f"data file {opts.data} not found"}))
        return

    import datasets
    import torch
    import transformers

    from align.data import load_rows, to_sft
    from align.models import load_tokenizer, resolve_model
    from align.recipe import DatasetSpec

    if opts.threads:
        torch.set_num_threads(opts.threads)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    model_path = resolve_model(opts.model, materialize=True).path
    tokenizer = load_tokenizer(model_path)
    spec = DatasetSpec(path=str(opts.data), format="alpaca", max_samples=opts.examples)
    rows = load_rows(spec)
    train_ds = to_sft(rows, "alpaca", chat=bool(tokenizer.chat_template), loss_on="completion", eos=tokenizer.eos_token)

    result: dict[str, Any] = {
        "model": opts.model,
        "data": str(opts.data),
        "examples": len(train_ds),
        "steps": math.ceil(len(train_ds) / opts.batch_size),
        "batch_size": opts.batch_size,
        "max_length": opts.max_length,
        "threads": torch.get_num_threads(),
        "load_avg": load_avg(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    peak = matmul_peak_gflops()
    with tempfile.TemporaryDirectory(prefix="sft-throughput-") as tmp:
        work = Path(tmp)
        cuda = torch.cuda.is_available()
        device_args = {"use_cpu": not cuda, "bf16": bool(cuda and torch.cuda.is_bf16_supported())}  # as align's
        trainers, args = {}, {}
        for name in opts.order.split(","):  # model loading and dataset preparation: not timed
            if name == "align":
                trainers[name], args[name] = align_trainer(model_path, train_ds, opts, work / "align")
            elif name == "baseline":
                trainers[name], args[name] = baseline_trainer(model_path, train_ds, opts, work, device_args)
            else:
                raise SystemExit(f"--order takes baseline and/or align, not {name!r}")
        result["interleaved"] = not opts.sequential
        with contextlib.redirect_stdout(sys.stderr):  # the trainers print their logs; stdout is for the JSON
            measured = run_sides(trainers, interleave=not opts.sequential)
        sides = {}
        for name, (timer, counter) in measured.items():
            sides[name] = summarize(trainers[name], timer, counter, n_params_forward(trainers[name].model))
            sides[name]["args_differing_from_trl_defaults"] = _diff_from_defaults(args[name])
        if "align" in trainers and not opts.no_loss_check:
            result["packed_loss_check"] = packed_loss_check(trainers["align"])
        del trainers
        gc.collect()
    peak = max(peak, matmul_peak_gflops())  # best of before and after, in case the machine was busy once
    for side in sides.values():
        side["mfu"] = round(side["achieved_gflops"] / peak, 4)
    result.update(
        baseline=sides.get("baseline"),
        align=sides.get("align"),
        load_avg_end=load_avg(),
        matmul_peak_gflops=round(peak, 1),
    )
    if "baseline" in sides and "align" in sides:
        result["speedup"] = round(sides["align"]["tokens_per_s"] / sides["baseline"]["tokens_per_s"], 3)
        result["speedup_median_step"] = round(
            sides["align"]["tokens_per_s_median_step"] / sides["baseline"]["tokens_per_s_median_step"], 3
        )
        result["speedup_all_steps"] = round(
            sides["align"]["tokens_per_s_all_steps"] / sides["baseline"]["tokens_per_s_all_steps"], 3
        )
        result["same_epoch_tokens"] = sides["align"]["epoch_tokens"] == sides["baseline"]["epoch_tokens"]
    result["align_mfu"] = sides["align"]["mfu"] if "align" in sides else None
    result["baseline_mfu"] = sides["baseline"]["mfu"] if "baseline" in sides else None
    result["flops_formula"] = (
        "LoRA training FLOPs ~= 4 * N_params_forward * real_tokens (forward 2N + backward to activations 2N; "
        "no weight gradients for frozen weights); attention-score FLOPs and gradient-checkpointing recompute "
        "not counted. mfu = achieved GFLOP/s / matmul_peak_gflops (best fp32 2048x2048 torch.matmul, same threads)"
    )
    print(json.dumps(result, indent=2))


def _diff_from_defaults(args: dict[str, Any]) -> dict[str, Any]:
    """The arguments that differ from SFTConfig's own defaults (what each side really changes)."""
    import dataclasses

    from align.trl_compat import SFTConfig

    defaults = {f.name: f.default for f in dataclasses.fields(SFTConfig)}
    return {k: v for k, v in args.items() if k != "output_dir" and (k not in defaults or v != defaults[k])}


if __name__ == "__main__":
    main()
