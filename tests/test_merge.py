"""`align.merge.merge`: LoRA / DoRA / stacked adapters folded into the base equal base + adapter; refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import align, sft_recipe, write_recipe

from align.errors import RecipeError
from align.merge import merge
from align.models import load_for_inference, locate

IDS = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 11, 12, 40, 41, 3]])


@pytest.fixture(scope="module")
def run(adapters_run) -> Path:
    """A real run (conftest.adapters_run, shared with test_hub.py): LoRA SFT, DoRA SFT on the base, a LoRA SFT on
    top of the first one, a reward model and an eval stage."""
    return adapters_run


def stage_artifact(stage: Path) -> dict:
    return locate(json.loads((stage / "stage.json").read_text())["output"], stage)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits.float()


def base_logits(stage: Path) -> torch.Tensor:
    from align.models import load_causal_lm

    base = stage_artifact(stage)["base"]
    return logits(load_causal_lm(Path(base), dtype="float32"))


def load_merged(out: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)


@pytest.mark.parametrize("stage", ["sft", "dora"])
def test_merged_logits_equal_base_plus_adapter(run, tmp_path, stage):
    out = merge(run / stage, tmp_path / "merged")
    assert out == tmp_path / "merged"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "chat_template.jinja" in names and not any(n.endswith(".bin") for n in names)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # the temporary folder is gone
    model, tok = load_merged(out)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>")
    assert not hasattr(model, "peft_config")
    adapted = logits(load_for_inference(stage_artifact(run / stage), dtype="float32"))
    merged = logits(model)
    assert (adapted - base_logits(run / stage)).abs().max() > 1e-3  # the adapter changes something
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=0)


def test_dora_adapter_is_dora(run):
    assert json.loads((run / "dora" / "adapter" / "adapter_config.json").read_text())["use_dora"] is True


def test_adapter_folder_in_a_stage_and_a_bare_copy(run, tmp_path):
    """The adapter folder of a stage merges as its stage; a copy elsewhere folds onto base_model_name_or_path."""
    ref = logits(load_merged(merge(run / "sft", tmp_path / "ref"))[0])
    via_folder = logits(load_merged(merge(run / "sft" / "adapter", tmp_path / "a"))[0])
    torch.testing.assert_close(via_folder, ref, atol=1e-5, rtol=0)
    bare = tmp_path / "elsewhere" / "my-adapter"
    shutil.copytree(run / "sft" / "adapter", bare)
    from_bare = logits(load_merged(merge(bare, tmp_path / "b"))[0])
    torch.testing.assert_close(from_bare, ref, atol=1e-5, rtol=0)


def test_adapter_on_an_earlier_adapter_folds_the_chain(run, tmp_path):
    art = stage_artifact(run / "sft2")
    assert isinstance(art["base"], dict) and art["base"]["kind"] == "adapter"  # sft2 is trained on sft
    merged = logits(load_merged(merge(run / "sft2", tmp_path / "m"))[0])
    chain = logits(load_for_inference(art, dtype="float32"))
    torch.testing.assert_close(merged, chain, atol=1e-4, rtol=0)
    only_sft = logits(load_for_inference(stage_artifact(run / "sft"), dtype="float32"))
    assert (merged - only_sft).abs().max() > 1e-4


@pytest.mark.parametrize(("dtype", "want"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_output(run, tmp_path, dtype, want):
    from safetensors.torch import load_file

    out = merge(run / "sft", tmp_path / dtype, dtype=dtype)
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {want}
    assert json.loads((out / "config.json").read_text())["dtype"] == str(want).replace("torch.", "")
    model, _ = load_merged(out)
    assert next(model.parameters()).dtype == want
    fp32 = logits(load_for_inference(stage_artifact(run / "sft"), dtype="float32"))
    assert (logits(model.float()) - fp32).abs().max() < 0.1


# ---------------------------------------------------------------- refusals


def refused(source: Path, out: Path, match: str, **kw) -> RecipeError:
    with pytest.raises(RecipeError, match=match) as e:
        merge(source, out, **kw)
    assert e.value.exit_code == 2
    return e.value


def test_refuses_a_folder_that_is_neither(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("hello")
    refused(tmp_path / "x", tmp_path / "out", "neither an adapter folder")
    refused(tmp_path / "missing", tmp_path / "out", "does not exist")
    assert not (tmp_path / "out").exists()


def test_refuses_a_stage_that_is_not_done(run, tmp_path):
    half = tmp_path / "runs" / "tiny" / "sft"
    shutil.copytree(run / "sft", half)
    (half / "stage.json").unlink()
    refused(half, tmp_path / "out", "not done")
    partial = tmp_path / "runs" / "tiny" / ".partial" / "sft"
    (partial / "checkpoints").mkdir(parents=True)
    refused(partial, tmp_path / "out", "not done")


def test_refuses_an_eval_stage_and_a_full_model(run, tmp_path):
    refused(run / "ppl", tmp_path / "out", "eval stage")
    full = tmp_path / "full"
    full.mkdir()
    (full / "stage.json").write_text(json.dumps({"type": "sft", "output": {"kind": "model", "path": "model"}}))
    refused(full, tmp_path / "out", "full weights")


def test_refuses_an_out_folder_that_is_not_empty_and_bad_dtype(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused(run / "sft", out, "not empty")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    refused(run / "sft", tmp_path / "file", "not a folder")
    refused(run / "sft", tmp_path / "new", "unknown dtype", dtype="int4")
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert merge(run / "sft", empty) == empty and (empty / "model.safetensors").is_file()


# ---------------------------------------------------------------- QLoRA


def test_qlora_adapter_merges_onto_the_unquantized_base(tmp_path, tiny_llama):
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the `qlora` extra)")
    recipe = sft_recipe(tmp_path, tiny_llama, adapter={"type": "qlora", "r": 4, "alpha": 8})
    recipe["stages"] = recipe["stages"][:1]
    recipe["stages"][0]["train"].update(max_steps=3, learning_rate=3e-2, save_steps=100)
    res = align("run", str(write_recipe(tmp_path, recipe)))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    stage = tmp_path / "runs" / "tiny" / "sft"
    merged, _ = load_merged(merge(stage, tmp_path / "merged"))
    assert getattr(merged, "hf_quantizer", None) is None and "quantization_config" not in merged.config.to_dict()
    adapted = logits(load_for_inference(stage_artifact(stage), dtype="float32"))  # fp32 base + the adapter
    assert (adapted - base_logits(stage)).abs().max() > 1e-4
    torch.testing.assert_close(logits(merged), adapted, atol=1e-4, rtol=0)


def test_a_quantized_base_checkpoint_is_dequantized_then_folded(tmp_path, tiny_llama):
    """An adapter whose base folder is a saved 4-bit checkpoint: the base is dequantized, then the adapter folded."""
    pytest.importorskip("bitsandbytes", reason="4-bit checkpoints need bitsandbytes (the `qlora` extra)")
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from align.quantization import bnb_4bit_config

    q4 = tmp_path / "base-4bit"
    AutoModelForCausalLM.from_pretrained(
        tiny_llama, quantization_config=bnb_4bit_config(torch.float32)
    ).save_pretrained(q4)
    assert "quantization_config" in json.loads((q4 / "config.json").read_text())
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(tiny_llama / f, q4 / f)  # the adapter folder has none: the base's is used
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), lora).save_pretrained(tmp_path / "adapter")
    cfg_file = tmp_path / "adapter" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "base_model_name_or_path": str(q4)}))
    merged, _ = load_merged(merge(tmp_path / "adapter", tmp_path / "merged"))
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    ref = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(q4).dequantize(dtype=torch.float32), cfg_file.parent
    )
    torch.testing.assert_close(logits(merged), logits(ref), atol=1e-4, rtol=0)
