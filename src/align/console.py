"""What a person sees while a run goes: one line per stage as it starts, one live progress line per training
stage, and none of the libraries' noise. `align run --verbose` (ALIGN_VERBOSE=1) restores the libraries' own
output: their progress bars, the trainers' dict logs and every warning. The full trainer logs are always in
each stage's `train_log.jsonl`.

On a terminal the progress line is redrawn in place; when the output is a file or a CI log it is printed as
plain lines (at most about one per tenth of the stage and one per minute), without carriage returns.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
import warnings
from typing import Any, TextIO

VERBOSE_ENV = "ALIGN_VERBOSE"

# Warnings that tell the user nothing they can act on: deprecations inside the libraries, and notices about
# choices align made on purpose. Real warnings (a truncated dataset, a missing pad token...) still print.
NOISE = (
    r"OMP_NUM_THREADS/MKL_NUM_THREADS unset",  # accelerate on multi-CPU: align sets the threads per process
    r"Setting accelerator to CPU",  # DeepSpeed's accelerator probe on a machine without a GPU
    r"mtime may not be reliable",  # transformers' checkpoint sorting on some filesystems
    r"`use_cache=True` is incompatible with gradient checkpointing",
    r"torch.utils.checkpoint: the use_reentrant parameter",
    r"None of the inputs have requires_grad=True",  # gradient checkpointing with a frozen input embedding
    r"Some weights of .* were not initialized",  # a reward model's new score head, which training fills
    r"You should probably TRAIN this model",
    r"No label_names provided for model class",  # a peft-wrapped model: TRL sets the labels itself
    r"The tokenizer has new PAD/BOS/EOS tokens",  # the trainer aligning the model config with the tokenizer
    r"pkg_resources is deprecated",
)
_NOISE_RE = re.compile("|".join(NOISE))


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def interactive(stream: TextIO | None = None) -> bool:
    """Output goes to a terminal (redraw lines in place) rather than a file or a CI log."""
    stream = stream or sys.stdout
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


def orchestrated() -> bool:
    """This is a stage process of `align run` (which prints the stage's start line and the closing summary)."""
    return bool(os.environ.get("ALIGN_PARENT_PID"))


def show_bars() -> bool:
    """Progress bars of align's own long loops (evaluation): on a terminal, or when asked for."""
    return verbose() or interactive(sys.stderr)


def expected_load_report(message: str) -> bool:
    """transformers' LOAD REPORT of a score head put on a causal LM (a reward model or PPO's value model): the
    head is new and the LM head unused, which is the point. Any other missing or unexpected weight still shows."""
    if "LOAD REPORT" not in message:
        return False
    rows = [[c.strip() for c in line.split("|")] for line in message.splitlines() if line.count("|") >= 2]
    rows = [r for r in rows if len(r) >= 2 and r[1] in ("MISSING", "UNEXPECTED", "MISMATCH")]
    return bool(rows) and all(
        (status == "MISSING" and key.startswith("score.")) or (status == "UNEXPECTED" and key.startswith("lm_head."))
        for key, status, *_ in rows
    )


class _Noise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot format itself is not ours to drop
            return True
        return not (_NOISE_RE.search(message) or expected_load_report(message))


def setup(*, want_verbose: bool = False) -> None:
    """Call first, before the libraries are imported. The environment carries the choice to stage processes."""
    if want_verbose:
        os.environ[VERBOSE_ENV] = "1"
    if verbose():
        return
    # progress bars of loading, tokenizing and mapping: a tokenized dataset is no news; the stage has its line
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=f".*{pattern}")
    noise = _Noise()
    # DeepSpeed's logger gets its own handler when deepspeed is imported; a filter on the logger object stays.
    logging.getLogger("DeepSpeed").addFilter(noise)
    logging.getLogger().addFilter(noise)
    for handler in logging.getLogger().handlers:
        handler.addFilter(noise)
    logging.lastResort.addFilter(noise)  # the libraries' loggers without a handler end here


def quiet_transformers() -> None:
    """transformers' own handler (configured on first use) drops the noise too."""
    if verbose():
        return
    from transformers.utils import logging as tlog

    root = tlog.get_logger()  # the library's root logger, with its handler in place
    for handler in root.handlers:
        handler.addFilter(_Noise())


# ---------------------------------------------------------------- the progress line


def clock(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def rate(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}" if x >= 10 else f"{x:.2f}"


# what the line shows besides the loss, first present wins: what a person watches during that kind of training
WATCH = (
    ("reward", "reward"),
    ("reward_mean", "reward"),
    ("objective/scores", "reward"),
    ("rewards/accuracies", "reward acc"),
    ("accuracy", "acc"),
    ("mean_token_accuracy", "token acc"),
)


class ProgressLine:
    """One line per training stage: `step 12/100 | loss 1.234 | reward 0.51 | 3.2k tok/s | 0:41 left`.

    Fed by the trainer's log dicts (or PPO's), on the main process only."""

    def __init__(self, stage: str, total: int, *, stream: TextIO | None = None, start_step: int = 0):
        self.stage, self.total = stage, max(int(total), 0)
        self.stream = stream or sys.stdout
        self.tty = interactive(self.stream)
        self.t0 = time.time()
        self.start_step = self.step = start_step
        self.loss: float | None = None
        self.watch: tuple[str, float] | None = None
        self.tokens0: tuple[float, float] | None = None  # (time, tokens) at the first log with a token count
        self.tok_rate: float | None = None
        self.last_print, self.last_printed_step = 0.0, -1
        self.width = 0
        self.closed = False

    def update(self, step: int, logs: dict[str, Any] | None = None, *, draw: bool = True) -> None:
        self.step = step
        logs = logs or {}
        for key in ("loss", "policy_loss"):
            if _num(logs.get(key)) is not None:
                self.loss = _num(logs[key])
                break
        for key, label in WATCH:
            if _num(logs.get(key)) is not None:
                self.watch = (label, _num(logs[key]))  # type: ignore[assignment]
                break
        tokens = _num(logs.get("num_tokens", logs.get("num_input_tokens_seen")))
        now = time.time()
        if tokens is not None:
            if self.tokens0 is None:
                self.tokens0 = (now, tokens)
            elif now > self.tokens0[0]:
                self.tok_rate = (tokens - self.tokens0[1]) / (now - self.tokens0[0])
        if draw and step > self.start_step:  # an evaluation before the first step has no line of its own
            self.draw()

    def text(self) -> str:
        parts = [f"{self.stage}  step {self.step}/{self.total or '?'}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g}")
        if self.watch is not None:
            parts.append(f"{self.watch[0]} {self.watch[1]:.3g}")
        elapsed = time.time() - self.t0
        done = self.step - self.start_step
        if self.tok_rate:
            parts.append(f"{rate(self.tok_rate)} tok/s")
        elif done > 0 and elapsed > 0:
            per = elapsed / done
            parts.append(f"{per:.1f} s/step" if per >= 1 else f"{1 / per:.1f} steps/s")
        if self.total and done > 0:
            left = (self.total - self.step) * elapsed / done
            parts.append(f"{clock(left)} left" if self.step < self.total else f"{clock(elapsed)} total")
        return "  " + " | ".join(parts)

    def draw(self, *, final: bool = False) -> None:
        if self.closed:
            return
        now = time.time()
        line = self.text()
        if self.tty:
            if final or now - self.last_print >= 0.2:
                pad = max(self.width - len(line), 0)
                self.stream.write("\r" + line + " " * pad + ("\n" if final else ""))
                self.stream.flush()
                self.width, self.last_print = len(line), now
            return
        # a log file: a line at the first step, about every tenth of the stage or minute, and at the end
        every = max(self.total // 10, 1) if self.total else 10
        due = self.last_printed_step < 0 or self.step - self.last_printed_step >= every or now - self.last_print >= 60
        if (final or due) and self.step != self.last_printed_step:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last_print, self.last_printed_step = now, self.step

    def close(self) -> None:
        self.draw(final=True)
        self.closed = True


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def trainer_progress(trainer: Any, stage: str) -> None:
    """Swap a transformers Trainer's tqdm bar and dict printer for one ProgressLine (not under --verbose)."""
    if verbose():
        return
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)

    class Progress(TrainerCallback):
        line: ProgressLine | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.is_world_process_zero:
                self.line = ProgressLine(stage, state.max_steps, start_step=state.global_step)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.line:  # a log follows at a logging step and draws; in between only a terminal redraws
                self.line.update(state.global_step, draw=self.line.tty)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if self.line and logs and "train_loss" not in logs:  # not the closing summary
                self.line.update(state.global_step, logs)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.line:
                self.line.close()

    trainer.add_callback(Progress())
