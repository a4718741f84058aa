"""Fold a LoRA / DoRA / QLoRA adapter into its base and save a plain model folder.

`merge(source, out)` takes an adapter folder (peft's: adapter_config.json + adapter_model.safetensors) or a
finished stage folder (with stage.json) and writes `out/`: config, safetensors weights, generation config,
tokenizer and chat template, so `AutoModelForCausalLM.from_pretrained(out)` and
`AutoTokenizer.from_pretrained(out)` load it with nothing else.

- A stage folder's record (stage.json `output`) names the whole chain: an adapter trained on an earlier
  stage's adapter is folded onto that one folded into the base, as `align.models.load_for_inference` does.
  An adapter folder inside a finished stage folder is treated as that stage. A bare adapter folder is
  folded onto its `base_model_name_or_path` (a local folder or a hub id).
- The fold is done in fp32 on the CPU (the most exact; it needs about 4 bytes per parameter of memory),
  then the weights are cast to `dtype` (bf16 | fp16 | fp32) and saved.
- QLoRA: the base is loaded unquantized (the full-precision folder the 4-bit weights came from); a base
  folder that is itself a quantized checkpoint (`quantization_config` in its config.json) is dequantized
  first. The adapter was trained against the 4-bit weights, so the merged model differs from the trained
  one by the quantization error, as with every QLoRA merge.
- Refused (`RecipeError`, exit 2) before anything is loaded: a folder that is neither, a stage that is not
  done, an eval stage, a stage whose output is already a full model, an `out` that exists and is not an
  empty folder, an unknown dtype. The result is written to a temporary folder next to `out`, then renamed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from align.errors import RecipeError

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def merge(source: Path, out: Path, *, dtype: str = "fp32") -> Path:
    """Fold the adapter `source` names into its base and save the model in `out`; returns `out`."""
    source, out = Path(source).expanduser(), Path(out).expanduser()
    torch_dtype = _torch_dtype(dtype)
    check_out(out)
    artifact, tokenizer_dir = resolve_source(source)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-merging-", dir=out.parent))
    try:
        model = load_folded(artifact)
        model = model.to(torch_dtype)
        model.config.dtype = torch_dtype
        model.save_pretrained(tmp)
        _save_tokenizer(tokenizer_dir if _has_tokenizer(tokenizer_dir) else _innermost_base(artifact), tmp)
        if not list(tmp.glob("*.safetensors")) or not (tmp / "config.json").is_file():
            raise RecipeError(f"merging {source} wrote no safetensors weights; nothing was saved", "merge")
        for junk in tmp.glob("*.bin"):  # never pickles (training_args.bin and the like)
            junk.unlink()
        if out.is_dir():
            out.rmdir()  # empty, checked above; a file put there meanwhile makes this fail, not vanish
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _torch_dtype(name: str) -> Any:
    import torch

    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DTYPES:
        raise RecipeError(f"unknown dtype `{name}`; use one of {', '.join(DTYPES)}", "dtype")
    return getattr(torch, DTYPES[key])


def check_out(out: Path) -> None:
    """`out` must not exist, or be an empty folder."""
    if out.exists() and not out.is_dir():
        raise RecipeError(f"{out} exists and is not a folder; choose a new output folder", "out")
    if out.is_dir() and any(out.iterdir()):
        raise RecipeError(f"{out} exists and is not empty; choose a new output folder or remove it", "out")


def read_stage(stage_dir: Path) -> dict[str, Any]:
    """The stage.json of a finished stage folder, checked to be readable; refusals name the folder."""
    f = stage_dir / "stage.json"
    if not f.is_file():
        if looks_like_stage(stage_dir):
            raise RecipeError(
                f"stage `{stage_dir.name}` in {stage_dir} is not done (no stage.json); "
                "finish it with `align run` first",
                "source",
            )
        raise RecipeError(
            f"{stage_dir} is neither an adapter folder (adapter_config.json) nor a finished stage folder (stage.json)",
            "source",
        )
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise RecipeError(f"{f} is unreadable ({type(e).__name__}); re-run the stage", "source") from None
    if not isinstance(info, dict) or not isinstance(info.get("output"), dict) or "kind" not in info["output"]:
        raise RecipeError(f"{f} has no `output` record; re-run the stage", "source")
    return info


def looks_like_stage(folder: Path) -> bool:
    """A stage folder without stage.json: in progress (`.partial/<stage>`) or interrupted."""
    if folder.parent.name == ".partial" or ".partial" in folder.parts:
        return True
    return any((folder / n).exists() for n in ("config.yaml", "inputs.json", "fingerprint", "checkpoints", "out"))


def resolve_source(source: Path) -> tuple[dict[str, Any], Path | None]:
    """The adapter record to fold (absolute paths, as `align.models.locate` makes them) and the folder whose
    tokenizer goes with the merged model."""
    from align.models import locate

    if not source.is_dir():
        raise RecipeError(f"{source} does not exist or is not a folder", "source")
    if not (source / "stage.json").is_file() and (source / "adapter_config.json").is_file():
        parent = source.resolve().parent
        if (parent / "stage.json").is_file():
            info = read_stage(parent)
            if (
                info["output"].get("kind") == "adapter"
                and (parent / info["output"]["path"]).resolve() == source.resolve()
            ):
                return resolve_source(parent)
        return _bare_adapter(source), source
    info = read_stage(source)
    kind = info["output"]["kind"]
    if kind == "metrics":
        raise RecipeError(f"`{source.name}` is an eval stage: it wrote metrics, no model to merge", "source")
    if kind != "adapter":
        where = source / info["output"].get("path", "")
        raise RecipeError(
            f"stage `{source.name}` wrote full weights ({kind} in {where}), not an adapter: nothing to merge; "
            "use that folder as it is",
            "source",
        )
    artifact = locate(info["output"], source)
    adapter_dir = Path(artifact["path"])
    if not (adapter_dir / "adapter_config.json").is_file():
        raise RecipeError(f"the adapter of stage `{source.name}` is missing from {adapter_dir}", "source")
    return artifact, adapter_dir


def _bare_adapter(folder: Path) -> dict[str, Any]:
    """An adapter folder outside any stage: its base is `base_model_name_or_path` (a folder or a hub id)."""
    from align.models import resolve_model

    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise RecipeError(f"{folder / 'adapter_config.json'} is unreadable ({type(e).__name__})", "source") from None
    ref = cfg.get("base_model_name_or_path")
    if not ref:
        raise RecipeError(f"{folder / 'adapter_config.json'} names no `base_model_name_or_path`", "source")
    base = resolve_model(str(ref), cfg.get("revision"), materialize=True).path
    if base is None:
        raise RecipeError(f"the base model `{ref}` of {folder} is not available here", "source")
    return {"kind": "adapter", "path": str(folder.resolve()), "base": str(base)}


def load_folded(artifact: dict[str, Any]) -> Any:
    """The model an artifact record describes, every adapter folded in, weights in fp32 on the CPU."""
    from peft import PeftModel

    if artifact["kind"] == "model":
        return load_base(Path(artifact["path"]))
    if artifact["kind"] != "adapter":
        raise RecipeError(f"cannot merge an artifact of kind `{artifact['kind']}`", "source")
    base_ref = artifact["base"]
    base = load_folded(base_ref) if isinstance(base_ref, dict) else load_base(Path(base_ref))
    return PeftModel.from_pretrained(base, Path(artifact["path"])).merge_and_unload()


def load_base(path: Path) -> Any:
    """A base model in fp32; a quantized checkpoint (bitsandbytes & co.) is dequantized."""
    import torch

    from align.models import load_causal_lm

    if not (path / "config.json").is_file():
        raise RecipeError(f"the base model folder {path} has no config.json", "source")
    model = load_causal_lm(path, dtype="float32")
    if getattr(model, "hf_quantizer", None) is not None:
        model = model.dequantize(dtype=torch.float32)
        # The quantizer's load-time weight conversions cannot be undone at save time (nor need to be: the
        # weights are plain now); keep only the model's own, reversible ones.
        conversions = getattr(model, "_weight_conversions", None)
        if conversions:
            model._weight_conversions = [c for c in conversions if _reversible(c)]
    return model


def _reversible(conversion: Any) -> bool:
    try:
        conversion.reverse_transform()
    except NotImplementedError:
        return False
    return True


def _has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and any((folder / n).is_file() for n in TOKENIZER_FILES)


def _innermost_base(artifact: dict[str, Any]) -> Path | None:
    base = artifact.get("base")
    if isinstance(base, dict):
        return _innermost_base(base)
    return Path(base) if base else Path(artifact["path"])


def _save_tokenizer(tokenizer_dir: Path | None, out: Path) -> None:
    """The adapter's tokenizer (align saves it with every adapter, chat template included); else the base's."""
    from transformers import AutoTokenizer

    if not _has_tokenizer(tokenizer_dir):
        print(f"[align] no tokenizer next to the adapter nor in its base: {out} has none", flush=True)
        return
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    template = tokenizer_dir / "chat_template.jinja"
    if template.is_file() and not (out / "chat_template.jinja").is_file():
        shutil.copyfile(template, out / "chat_template.jinja")
