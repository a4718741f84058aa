"""A disk that fills up while a checkpoint is written: a message that says so, and a run that resumes once there
is room again. The disk is a real, small tmpfs (mounting needs root; elsewhere the test skips)."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import align, align_in_process, sft_recipe, write_recipe


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_disk_full_while_checkpointing_says_so_and_resumes(tmp_path, tiny_llama, small_disk, capsys):
    recipe = sft_recipe(tmp_path, tiny_llama)
    recipe["stages"] = recipe["stages"][:1]
    recipe["stages"][0]["train"].update(max_steps=60, save_steps=1, save_total_limit=1000)
    recipe["output_dir"] = str(small_disk / "runs")
    path = write_recipe(tmp_path, recipe)
    res = align("run", str(path))
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "the disk is full" in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "then run the same command again: it resumes from checkpoint-" in res.stderr
    said = res.stderr.split("it resumes from ")[1].split()[0]
    assert "resumable" in align_in_process("plan", str(path), capsys=capsys).stdout

    subprocess.run(["mount", "-o", "remount,size=30m", str(small_disk)], check=True)
    again = align("run", str(path))
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    m = json.loads((small_disk / "runs" / "tiny" / "sft" / "stage.json").read_text())["metrics"]
    assert m["resumed_from"] == said and m["steps"] == 60
