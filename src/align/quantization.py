"""QLoRA support checks: is bitsandbytes 4-bit usable here, and are its LoRA gradients right?

bitsandbytes' CPU path is young. Its 4-bit matmul has an autograd Function on the training path
(exact, as measured here), but after any eval-mode forward on an AVX512-BF16 CPU the weights are
repacked for a fused inference op that has no autograd kernel: torch warns "an autograd kernel was
not registered" and the gradient that flows *through* the frozen base weight (dL/dx = dL/dy @ W,
which every LoRA layer below depends on) is silently dropped. So before training QLoRA on CPU we
measure the LoRA gradients against a plain model that holds exactly the dequantized weights.

bitsandbytes is imported inside functions only, so importing this module never fails without it.
"""

from __future__ import annotations

import functools
import gc
import importlib.metadata
import importlib.util
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig, PreTrainedModel

# Oldest bitsandbytes the `qlora` extra in pyproject.toml is tested with (it has the CPU backend).
_MIN_BNB = "0.49"
# Devices bitsandbytes >= 0.46 ships 4-bit kernels for (its `supported_torch_devices`); kept here
# so the plan-time check does not pay the seconds-long `import bitsandbytes`.
_BNB_DEVICES = frozenset({"cpu", "cuda", "xpu", "hpu", "npu", "mps"})


def _device() -> str:
    """The device a stage process would train on, by the same preference as transformers."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def qlora_unavailable_reason() -> str | None:
    """Why 4-bit loading cannot work here, or None. Metadata only, so it is cheap at plan time.

    None does not mean gradients are right: on CPU call `check_qlora_gradients` too.
    """
    from packaging.version import Version

    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    version = importlib.metadata.version("bitsandbytes")
    if Version(version) < Version(_MIN_BNB):
        return f"bitsandbytes {version} is too old for 4-bit on this stack; need >= {_MIN_BNB}"
    if importlib.util.find_spec("accelerate") is None:
        return "accelerate is not installed (transformers needs it to load a 4-bit model)"
    device = _device()
    if device not in _BNB_DEVICES:
        return f"bitsandbytes {version} has no 4-bit kernels for device {device!r}"
    return None


def bnb_4bit_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """The QLoRA paper's setup: NF4 with double-quantized scales.

    uint8 storage: storage must equal the parameter dtype only when FSDP shards the 4-bit
    weights, which a single-process QLoRA run never does.
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


@dataclass
class GradCheck:
    """Outcome of `check_qlora_gradients`; `detail` is one line fit for a log or an error."""

    ok: bool
    max_rel_err: float
    n_params: int
    detail: str


def dequantized_state_dict(model_4bit: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A plain fp32 state dict holding exactly the weights the 4-bit model computes with.

    Re-reading the checkpoint would give the *unquantized* weights, whose gradients differ
    from the 4-bit model's by the quantization error and would hide the error we look for.
    Non-quantized tensors may share memory with the model: load the dict, don't train on it.
    Raises if a weight was repacked for CPU inference: that layout cannot be dequantized.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    layers = {n: m for n, m in model_4bit.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    out: dict[str, torch.Tensor] = {}
    for name, module in layers.items():
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            raise ValueError(f"{name}: weight is repacked for CPU inference; dequantize before any eval forward")
        out[f"{name}.weight"] = dequantize_4bit(module.weight.data, state).float()
    # Not state_dict(): bitsandbytes would serialise every quant_state, which is slow and unwanted.
    for name, t in [*model_4bit.named_parameters(remove_duplicate=False), *model_4bit.named_buffers()]:
        out.setdefault(name, t.detach().float())
    return out


def _base_linear_in(module: torch.nn.Linear, dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
    """Linear4bit's arithmetic: input and weight cast to the compute dtype, output cast back."""
    bias = None if module.bias is None else module.bias.to(dtype)
    return torch.nn.functional.linear(x.to(dtype), module.weight.to(dtype), bias).to(x.dtype)


def _lora_grads(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """One training step's LoRA gradients (train mode: that is the path the trainer takes)."""
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}
    return {n: g.detach().float().clone() for n, g in grads.items()}  # a None grad is reported missing


def compare_grads(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float, what: str = "") -> GradCheck:
    """Per-parameter relative error ‖got - ref‖ / ‖ref‖, worst one reported.

    Relative per tensor so tiny and large layers count the same; a missing gradient counts as 1.
    """
    if not ref:
        return GradCheck(False, float("inf"), 0, "no LoRA parameters to compare")
    worst, worst_name = 0.0, ""
    for name, r in ref.items():
        g = got.get(name)
        if g is None or g.shape != r.shape:
            err = 1.0 if g is None else float("inf")
        else:
            err = ((g - r).norm() / r.norm().clamp_min(1e-30)).item()
        if not err <= worst:  # also catches nan
            worst, worst_name = err, name
    ok = worst <= tol
    verdict = "agree" if ok else "DISAGREE"
    detail = f"QLoRA gradients {verdict} with the fp32 reference{what}: max rel err {worst:.2e} (tol {tol:.0e})"
    if not ok:
        detail += f" at {worst_name}"
    return GradCheck(ok, worst, len(ref), detail)


def check_qlora_gradients(
    model_path: str,
    target_modules: list[str] | str,
    *,
    tol: float = 1e-2,
    seq_len: int = 16,
    seed: int = 0,
    compute_dtype: torch.dtype = torch.float32,
    eval_pass: bool = True,
    keep_train_layout: bool = False,
) -> GradCheck:
    """Compare LoRA gradients through the 4-bit model with those of its dequantized twin.

    Two training steps are measured: one on the fresh model and, with `eval_pass`, one after a
    no-grad eval forward, because on CPUs with AVX512-BF16 an eval forward permanently repacks
    the 4-bit weights into an inference layout whose matmul has no autograd kernel (bitsandbytes
    0.50) -- exactly what an SFT run with evaluation does. `keep_train_layout` applies the
    `keep_4bit_train_layout` workaround first, to check a run that uses it.

    The reference is an fp32 model whose formerly-4-bit linears compute in `compute_dtype`, as
    bitsandbytes does: with plain fp32 matmuls, bf16 rounding alone gave a 0.30 relative error
    on a 30-layer 135M model and would fail a correct setup.
    """
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device = _device()
    threads = torch.get_num_threads()
    # The check's matmuls are tiny, so threads buy little; on a busy 2-core box OpenMP
    # oversubscription made a 135M check 5x slower (~50 s instead of ~10 s).
    torch.set_num_threads(1)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=target_modules, task_type="CAUSAL_LM")
    gen = torch.Generator().manual_seed(seed)
    qmodel = ref = None
    try:
        qmodel = AutoModelForCausalLM.from_pretrained(
            model_path, quantization_config=bnb_4bit_config(compute_dtype), device_map={"": device}, dtype=torch.float32
        )
        if keep_train_layout:
            keep_4bit_train_layout(qmodel)
        ref_state = dequantized_state_dict(qmodel)  # before any eval forward can repack the weights
        quantized = {n for n, m in qmodel.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        qmodel = get_peft_model(qmodel, lora)
        lora_init = {}
        for name, p in qmodel.named_parameters():
            if "lora_" in name:  # peft zeroes lora_B, which would leave lora_A without a gradient
                scale = 0.02 if "lora_B" in name else p.shape[1] ** -0.5
                lora_init[name] = torch.randn(p.shape, generator=gen) * scale
                with torch.no_grad():
                    p.copy_(lora_init[name])
        input_ids = torch.randint(0, qmodel.config.vocab_size, (2, seq_len), generator=gen).to(device)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs = {"": _lora_grads(qmodel, input_ids)}
            if eval_pass:
                qmodel.eval()
                with torch.no_grad():
                    qmodel(input_ids=input_ids)
                runs[" after an eval forward"] = _lora_grads(qmodel, input_ids)
        no_autograd = any("autograd kernel was not registered" in str(w.message) for w in caught)
        del qmodel
        qmodel = None
        gc.collect()

        ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, device_map={"": device})
        missing = ref.load_state_dict(ref_state, strict=False).missing_keys
        if missing:
            raise RuntimeError(f"reference model lacks dequantized weights for {missing[:3]}")
        del ref_state
        for name in quantized:
            module = ref.get_submodule(name)
            module.forward = functools.partial(_base_linear_in, module, compute_dtype)
        ref = get_peft_model(ref, lora)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if "lora_" in name:
                    p.copy_(lora_init[name])
        want = _lora_grads(ref, input_ids)
        if set(want) != set(lora_init):
            raise RuntimeError("the reference model's LoRA layers got no gradient or differ from the 4-bit model's")

        checks = [compare_grads(got, want, tol, what) for what, got in runs.items()]
        result = max(checks, key=lambda c: (not c.ok, c.max_rel_err))
        if no_autograd:
            result.detail += "; torch warned that a bitsandbytes op has no autograd kernel"
        return result
    finally:
        torch.set_num_threads(threads)
        del qmodel, ref
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def keep_4bit_train_layout(model: PreTrainedModel | torch.nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference on an eval forward.

    The repacked layout (AVX512-BF16 CPUs) is served by a matmul without an autograd kernel, so
    every training step after the first evaluation would drop the gradient through the base
    weights. Costs only eval speed. Returns how many layers it touched.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for module in layers:
        module.support_avx512bf16_for_cpu = False
    return len(layers)
