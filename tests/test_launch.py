"""The launch: shipped configs by name (also from a wheel), `align plan`'s launch checks, the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, align_in_process, sft_recipe, write_recipe

from align.launch import LaunchInfo, check_launch, global_batch, launch_command, read_launch
from align.resources import accelerate_config_path, known_accelerate_configs, known_tasks


def test_every_shipped_config_reads():
    names = known_accelerate_configs()
    assert {"cpu", "multi_cpu", "single_gpu", "multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp"} <= set(names)
    assert "multi_node" in names and "deepspeed_zero3_offload" in names
    for name in names:
        info = read_launch(name, None)
        assert info.num_processes >= 1 and info.config_path == accelerate_config_path(name)
    assert read_launch("deepspeed_zero3", 2).sharding == "zero3"
    assert read_launch("deepspeed_zero3_offload", 2).sharding == "zero3_offload"
    assert read_launch("auto", 2).config_name == "multi_cpu"  # several processes on a CPU machine


def _plan(tmp_path, tiny_llama, capsys, *args: str):
    return align_in_process("plan", str(write_recipe(tmp_path, sft_recipe(tmp_path, tiny_llama))), *args, capsys=capsys)


@pytest.mark.parametrize(
    "args, field, words",
    [
        (["--accelerate-config", "nope"], "--accelerate-config", "known: cpu"),
        (["--accelerate-config", "cpu", "--num-processes", "2"], "launch.num_processes", "use `multi_cpu`"),
        (["stages.sft.launch.num_processes=2"], "launch.num_processes", "`mode: python` starts one"),
        (["--accelerate-config", "deepspeed_zero3", "stages.sft.adapter.type=qlora"], "accelerate_config", "QLoRA"),
        (["--num-processes", "0"], "--num-processes", "at least 1"),
    ],
)
def test_plan_rejects_bad_launches(tmp_path, tiny_llama, capsys, args, field, words):
    res = _plan(tmp_path, tiny_llama, capsys, *args)
    assert res.returncode == 2, res.stdout + res.stderr
    assert field in res.stderr and words in res.stderr, res.stderr
    assert not (tmp_path / "runs").exists()  # nothing ran, nothing was written


def test_plan_rejects_a_deepspeed_batch_that_disagrees(tmp_path, tiny_llama, capsys):
    cfg = tmp_path / "ds.yaml"
    cfg.write_text(
        "distributed_type: DEEPSPEED\nnum_processes: 2\nnum_machines: 1\nmixed_precision: 'no'\n"
        "deepspeed_config: {zero_stage: 2, train_batch_size: 16, train_micro_batch_size_per_gpu: 4}\n"
    )
    # sft_recipe: micro batch 4, accumulation 1
    res = _plan(tmp_path, tiny_llama, capsys, "--accelerate-config", str(cfg))
    assert res.returncode == 2
    assert "train_batch_size=16" in res.stderr and "4 x accumulation 1 x 2 processes = 8" in res.stderr
    ok = _plan(
        tmp_path, tiny_llama, capsys, "--accelerate-config", str(cfg), "stages.sft.train.gradient_accumulation_steps=2"
    )
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: [oops\n")
    res = _plan(tmp_path, tiny_llama, capsys, "--accelerate-config", str(bad))
    assert res.returncode == 2 and "not valid YAML" in res.stderr


def test_ppo_and_grpo_under_configs_they_do_not_support():
    from align.stages.registry import stage_type

    found = stage_type("ppo").launch_problems(read_launch("deepspeed_zero2", 2), "s")
    assert found and "DDP only" in found[0][1] and "multi_gpu" in found[0][1]
    assert found[0][0] == "s.launch.accelerate_config"
    assert stage_type("ppo").launch_problems(read_launch("multi_gpu", 2), "s") == []
    fsdp = read_launch("fsdp", 2)
    found = stage_type("grpo").launch_problems(fsdp, "s")
    found += check_launch(fsdp, adapter_type="lora", micro_batch=4, grad_accum=1, where="s")[0]
    assert any("FSDP" in m for _, m in found)


def test_plan_table_and_json_show_launch_and_global_batch(tmp_path, tiny_llama, capsys):
    path = write_recipe(tmp_path, sft_recipe(tmp_path, tiny_llama))
    res = align_in_process("plan", str(path), "--accelerate-config", "multi_cpu", "--num-processes", "2", capsys=capsys)
    assert res.returncode == 0, res.stderr
    assert "launch multi_cpu x2, global batch 8 (4 per process x 1 accumulation x 2 processes)" in res.stdout
    res = align_in_process(
        "plan", str(path), "--accelerate-config", "deepspeed_zero3", "--num-processes", "2", "--json", capsys=capsys
    )
    plan = json.loads(res.stdout)
    sft = plan["stages"][0]
    assert sft["launch"]["zero_stage"] == 3 and sft["launch"]["num_processes"] == 2
    assert sft["batch"] == {"micro": 4, "accumulation": 1, "global": 8}
    assert any("GPU(s) per machine" in n for n in plan["notes"])  # planned here, run elsewhere: a note


def test_launch_command_follows_the_hardware_and_reads_multi_node_env():
    info = read_launch("deepspeed_zero3", 2)
    cmd, env = launch_command(info, dtype="auto", stage_args=["-m", "align"], env={})
    assert cmd[cmd.index("--mixed_precision") + 1] == "no"  # CPU: nothing contradicts the trainer's bf16=False
    assert cmd[cmd.index("--num_processes") + 1] == "2" and "--main_process_port" in cmd
    cpu, env = launch_command(read_launch("multi_cpu", 2), dtype="auto", stage_args=[], env={})
    assert "--multi_gpu" in cpu and env["CUDA_VISIBLE_DEVICES"] == ""
    node = read_launch("multi_node", 2)
    with pytest.raises(Exception, match="MACHINE_RANK"):
        launch_command(node, dtype="auto", stage_args=[], env={})
    cmd, _ = launch_command(
        node, dtype="auto", stage_args=[], env={"SLURM_NODEID": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "6000"}
    )
    assert cmd[cmd.index("--machine_rank") + 1] == "1" and cmd[cmd.index("--main_process_ip") + 1] == "10.1.2.3"
    assert cmd[cmd.index("--main_process_port") + 1] == "6000"


def test_global_batch():
    info = LaunchInfo("x", Path("x"), "MULTI_GPU", 8, 1)
    assert global_batch(info, 4, 2) == 64


def test_multi_cpu_starts_real_gloo_processes(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, torch.distributed as dist\nfrom accelerate import PartialState\ns = PartialState(cpu=True)\n"
        # one write per line: two ranks share the pipe, and print() writes each piece on its own when unbuffered
        "os.write(1, f\"RANK {os.environ['RANK']} {dist.get_world_size()} {dist.get_backend()}\\n\".encode())\n"
    )
    cmd, env = launch_command(
        read_launch("multi_cpu", 2), dtype="auto", stage_args=[str(script)], env=dict(__import__("os").environ)
    )
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = sorted(x for x in res.stdout.splitlines() if x.startswith("RANK"))
    assert lines == ["RANK 0 2 gloo", "RANK 1 2 gloo"]


def test_configs_and_tasks_resolve_from_a_wheel(tmp_path):
    """A plain, non-editable install holds the accelerate configs and task files, found by name elsewhere."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    site = tmp_path / "site"
    whl = next(wheels.glob("align-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(whl)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    code = (
        "import align, json; from align.resources import *; from align.evaluation.tasks import load_task\n"
        "print(json.dumps({'file': align.__file__, 'configs': known_accelerate_configs(), 'tasks': known_tasks(),"
        " 'multi_cpu': str(accelerate_config_path('multi_cpu')), 'task': load_task('mmlu_shared5').name,"
        " 'root': str(project_root())}))"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["file"].startswith(str(site))
    assert {"cpu", "multi_cpu", "deepspeed_zero3"} <= set(got["configs"])
    assert "mmlu_shared5" in got["tasks"] and got["task"] == "mmlu_shared5"
    assert Path(got["multi_cpu"]).is_file() and got["root"] == "None"


def test_shipped_task_names_resolve_in_the_checkout():
    assert {"mmlu_shared5", "wmt22_de_en", "dialogsum"} <= set(known_tasks())
