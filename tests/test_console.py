"""The console a person reads (and a CI log holds), and the experiment trackers a run reports to."""

from __future__ import annotations

import io
import struct
from pathlib import Path

from conftest import align, sft_recipe, write_recipe

from align import console, tracking


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_in_a_log_file_prints_about_ten_plain_lines() -> None:
    out = io.StringIO()
    line = console.ProgressLine("sft", 100, stream=out)
    for step in range(1, 101):
        line.update(step, {"loss": 2.0 - step / 100, "num_tokens": 256.0 * step})
    line.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text
    assert 10 <= len(lines) <= 12, lines
    assert lines[0].startswith("  sft  step 1/100 | loss 1.99")
    assert lines[-1].startswith("  sft  step 100/100 | loss 1") and lines[-1].endswith("total")
    assert "tok/s" in lines[-1]


def test_progress_line_on_a_terminal_redraws_one_line() -> None:
    out = Terminal()
    line = console.ProgressLine("dpo", 3, stream=out)
    for step in (1, 2, 3):
        line.update(step, {"loss": 0.69, "rewards/accuracies": 0.5})
        line.last_print = 0.0  # as if time passed: every update redraws
    line.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, finished once
    assert text.count("\r") >= 3
    assert "reward acc 0.5" in text and "step 3/3" in text


def test_progress_line_after_a_resume_counts_the_rate_from_the_resumed_step() -> None:
    out = io.StringIO()
    line = console.ProgressLine("ppo", 10, stream=out, start_step=6)
    line.update(7, {"policy_loss": 0.1, "reward_mean": 0.25})
    line.close()
    assert "step 7/10" in out.getvalue() and "reward 0.25" in out.getvalue() and "left" in out.getvalue()


def test_only_the_expected_load_report_is_dropped() -> None:
    head = "LlamaForSequenceClassification LOAD REPORT from: /x\nKey | Status | \n---+---+-\n"
    expected = head + "lm_head.weight | UNEXPECTED | \nscore.weight   | MISSING    | \n"
    real = head + "model.layers.0.mlp.up_proj.weight | MISSING | \nscore.weight | MISSING | \n"
    assert console.expected_load_report(expected)
    assert not console.expected_load_report(real)
    assert not console.expected_load_report("nothing to do with loading")


def test_report_to_is_checked_at_plan_time() -> None:
    assert tracking.check("none", "w") == [] and tracking.check(None, "w") == []
    [(where, msg)] = tracking.check("tensorbord", "stages[0].train.report_to")
    assert where == "stages[0].train.report_to" and "tensorboard" in msg and "wandb" in msg
    if "wandb" not in tracking.installed():
        [(_, msg)] = tracking.check(["wandb"], "w")
        assert "pip install wandb" in msg
    assert tracking.check([1], "w")[0][1].startswith("`report_to` takes tracker names")


def test_tracker_names_one_group_per_run(tmp_path: Path, monkeypatch) -> None:
    for var in ("WANDB_RUN_GROUP", "WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME", "TENSORBOARD_LOGGING_DIR"):
        monkeypatch.delenv(var, raising=False)
    env = tracking.environ(tmp_path / "tiny", "sft", ["tensorboard", "wandb", "mlflow"])
    assert env["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "tiny" / "tensorboard" / "sft")
    assert env["WANDB_RUN_GROUP"] == "tiny" and env["MLFLOW_EXPERIMENT_NAME"] == "tiny"
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    assert "WANDB_PROJECT" not in tracking.environ(tmp_path / "tiny", "sft", "wandb")  # the user's setting wins


def scalar_tags(folder: Path) -> dict[str, list[float]]:
    """Scalars of the TensorBoard event files under `folder` (TFRecord framing, read without TensorFlow)."""
    from tensorboardX.proto import event_pb2

    tags: dict[str, list[float]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                tags.setdefault(v.tag, []).append(v.simple_value)
    return tags


def test_align_run_console_and_tensorboard(tmp_path: Path, tiny_llama: Path) -> None:
    """A run read as a person would, from a log file: a start line per stage, plain progress lines, no library
    noise, a summary; the trainer logs reach TensorBoard under the run folder; --verbose shows the raw logs."""
    recipe = sft_recipe(tmp_path, tiny_llama)
    recipe["stages"][0]["train"]["report_to"] = "tensorboard"
    path = write_recipe(tmp_path, recipe)
    res = align("run", str(path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "\r" not in out
    for noise in (
        "FutureWarning",
        "warnings.warn",
        "Setting accelerator to CPU",
        "{'loss'",
        "it/s]",
        "Loading weights",
    ):
        assert noise not in out, noise
    assert "[align] sft: running sft (lora) from base | python x1 | 6 steps" in out
    assert "[align] ppl: running eval on base, sft | python x1" in out
    steps = [x for x in res.stdout.splitlines() if x.startswith("  sft  step ")]
    assert [x.split()[2] for x in steps] == [f"{i}/6" for i in range(1, 7)]
    assert all("| loss " in x for x in steps) and steps[-1].endswith("total")
    assert res.stdout.count("| held/perplexity |") == 1  # the table once, in the closing summary
    run = tmp_path / "runs" / "tiny"
    logged = scalar_tags(run / "tensorboard" / "sft")
    assert len(logged.get("train/loss", [])) == 6, sorted(logged)

    again = align("run", str(path), "--force", "sft", "--verbose")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "'loss'" in again.stdout + again.stderr  # the trainer's own dict logs are back
    assert "  sft  step " not in again.stdout
