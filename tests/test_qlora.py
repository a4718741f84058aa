"""QLoRA gradient check on a tiny local llama: it runs, it agrees where bitsandbytes is right, and it can fail."""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import pytest
import torch

from align import quantization as q


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e '.[qlora]')")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, bnb) -> Path:
    """A 2-layer llama; every dim a multiple of bitsandbytes' 64-value quantization block."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-qlora")
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def assert_consistent(r: q.GradCheck) -> None:
    """ok must mean a negligible error, not-ok a clear disagreement, never a borderline value."""
    assert math.isfinite(r.max_rel_err), r
    if r.ok:
        assert r.max_rel_err < 1e-4, r
    else:
        assert r.max_rel_err > 0.1, r
        assert "DISAGREE" in r.detail


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_train_step_gradients_agree(tiny_path: Path, dtype: torch.dtype) -> None:
    """A fresh 4-bit model in train mode goes through bitsandbytes' autograd Function: exact."""
    r = q.check_qlora_gradients(str(tiny_path), ["q_proj", "v_proj", "down_proj"], compute_dtype=dtype, eval_pass=False)
    assert_consistent(r)
    assert r.ok, r.detail
    assert r.n_params == 2 * 3 * 2  # layers x targets x (A, B)


def test_after_eval_forward(tiny_path: Path, bnb) -> None:
    """An eval forward repacks the weights on AVX512-BF16 CPUs; the default check must catch it."""
    r = q.check_qlora_gradients(str(tiny_path), "all-linear")
    assert_consistent(r)
    assert r.n_params == 2 * 7 * 2
    if not r.ok:  # only the repacked path may be wrong, and torch says why
        assert "after an eval forward" in r.detail and "autograd kernel" in r.detail, r.detail
    if q._device() == "cpu" and bnb.functional.has_avx512bf16():
        assert not r.ok, "bitsandbytes may have fixed the repacked path: revisit keep_4bit_train_layout"
    guarded = q.check_qlora_gradients(str(tiny_path), "all-linear", keep_train_layout=True)
    assert guarded.ok and guarded.max_rel_err < 1e-4, guarded.detail


def test_check_detects_a_wrong_reference(tiny_path: Path, monkeypatch) -> None:
    """A reference whose base weights are 10% off must be reported as a disagreement."""
    wrong = q._base_linear_in

    def off_by_ten_percent(module, dtype, x):
        return 1.1 * wrong(module, dtype, x)

    monkeypatch.setattr(q, "_base_linear_in", off_by_ten_percent)
    r = q.check_qlora_gradients(str(tiny_path), ["q_proj", "v_proj"], eval_pass=False)
    assert not r.ok and r.max_rel_err > 0.1, r


def test_compare_grads_flags_differences() -> None:
    g = torch.Generator().manual_seed(0)
    ref = {"a": torch.randn(4, 8, generator=g), "b": torch.randn(8, 4, generator=g)}
    same = q.compare_grads({k: v.clone() for k, v in ref.items()}, ref, tol=1e-2)
    assert same.ok and same.max_rel_err == 0 and same.n_params == 2
    noisy = {"a": ref["a"].clone(), "b": ref["b"] + 0.05 * ref["b"].norm() * torch.randn(8, 4, generator=g) / 4}
    bad = q.compare_grads(noisy, ref, tol=1e-2)
    assert not bad.ok and 1e-2 < bad.max_rel_err < 1 and bad.detail.endswith(" at b")
    assert not q.compare_grads({"a": ref["a"]}, ref, tol=1e-2).ok  # a missing gradient is a failure
    assert not q.compare_grads({k: torch.full_like(v, math.nan) for k, v in ref.items()}, ref, tol=1e-2).ok


def test_dequantized_state_dict_matches_and_refuses_repacked(tiny_path: Path, bnb) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_path, quantization_config=q.bnb_4bit_config(torch.float32), device_map={"": "cpu"}, dtype=torch.float32
    )
    sd = q.dequantized_state_dict(model)
    w = model.model.layers[0].self_attn.q_proj
    assert isinstance(w, bnb.nn.Linear4bit)
    x = torch.randn(3, 64)
    with torch.no_grad():
        model.train()  # keep the training layout for this comparison
        torch.testing.assert_close(w(x), x @ sd["model.layers.0.self_attn.q_proj.weight"].T, rtol=1e-6, atol=1e-6)
    assert set(sd) >= {k for k in AutoModelForCausalLM.from_pretrained(tiny_path).state_dict()}
    if bnb.functional.has_avx512bf16():
        model.eval()
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 4, dtype=torch.long))
        with pytest.raises(ValueError, match="repacked"):
            q.dequantized_state_dict(model)


def test_bnb_4bit_config() -> None:
    cfg = q.bnb_4bit_config(torch.bfloat16)
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16 and cfg.bnb_4bit_quant_storage == torch.uint8


def test_unavailable_reason_is_cheap(monkeypatch) -> None:
    t = time.perf_counter()
    reason = q.qlora_unavailable_reason()
    assert time.perf_counter() - t < 1.0
    assert reason is None or (isinstance(reason, str) and "\n" not in reason)
    if importlib.util.find_spec("bitsandbytes") is None:
        assert reason is not None and "bitsandbytes" in reason

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    assert "bitsandbytes is not installed" in q.qlora_unavailable_reason()
