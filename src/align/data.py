"""Dataset loading, format detection and conversion, mixtures, held-out splits, column checks.

Formats (detected from the columns of the first rows, or named with `format:`):
  messages           {messages: [{role, content}, ...]}
  prompt_completion  {prompt, completion} (strings or message lists)
  alpaca             {instruction, input?, output}
  text               {text}
  preference         {prompt?, chosen, rejected}
  hh_rlhf            {chosen, rejected} holding whole "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts
  prompt             {prompt} alone (prompts for online RL)
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

from align.errors import RecipeError

SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
REQUIRED = {
    "messages": ["messages"],
    "prompt_completion": ["prompt", "completion"],
    "alpaca": ["instruction", "output"],
    "text": ["text"],
    "preference": ["chosen", "rejected"],
    "hh_rlhf": ["chosen", "rejected"],
    "prompt": ["prompt"],
}
# The data formats a stage accepts are declared by its stage type (`Stage.formats`, align.stages).
TEXT_FORMATS = ("messages", "prompt_completion", "alpaca", "text")
PAIR_FORMATS = ("preference", "hh_rlhf")
PROMPT_FORMATS = ("prompt", "messages", "prompt_completion", "alpaca", "preference", "hh_rlhf")
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def is_local(path: str) -> bool:
    return Path(path).exists() or path.startswith((".", "/", "~")) or Path(path).suffix in SUFFIXES


def data_files(path: str) -> list[Path]:
    """The files behind a local dataset path (a file, or every supported file in a folder)."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix not in SUFFIXES:
            raise RecipeError(f"unsupported file type `{p.suffix}`; use one of {', '.join(SUFFIXES)}", "path")
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES and f.is_file())
        if not files:
            raise RecipeError(f"folder {p} holds no {'/'.join(SUFFIXES)} files", "path")
        if len({f.suffix for f in files} - {".json", ".jsonl"}) > 1 or (
            {SUFFIXES[f.suffix] for f in files} and len({SUFFIXES[f.suffix] for f in files}) > 1
        ):
            raise RecipeError(f"folder {p} mixes file types; keep one type per dataset", "path")
        return files
    raise RecipeError(f"file or folder not found: {p}", "path")


def peek_rows(path: str, n: int = 5) -> list[dict[str, Any]]:
    """The first rows of a local dataset, cheaply (no Arrow cache), for plan-time checks."""
    f = data_files(path)[0]
    try:
        if f.suffix == ".jsonl" or (f.suffix == ".json" and f.read_text()[:1] != "["):
            with f.open() as fh:
                return [json.loads(line) for line in itertools.islice((x for x in fh if x.strip()), n)]
        if f.suffix == ".json":
            return json.loads(f.read_text())[:n]
        if f.suffix == ".csv":
            with f.open(newline="") as fh:
                return list(itertools.islice(csv.DictReader(fh), n))
        import pyarrow.parquet as pq

        return pq.ParquetFile(f).read_row_group(0).slice(0, n).to_pylist()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise RecipeError(f"cannot read {f.name}: {e}", "path") from None


def detect_format(columns: set[str]) -> str | None:
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if {"chosen", "rejected"} <= columns:
        return "preference" if "prompt" in columns else "hh_rlhf"
    if "text" in columns:
        return "text"
    if "prompt" in columns:
        return "prompt"
    return None


def check_format(
    rows: list[dict[str, Any]], spec: Any, allowed: tuple[str, ...], field: str, *, who: str = "this"
) -> tuple[str, list[tuple[str, str]]]:
    """Return (format, problems) for the first rows of a dataset used by a stage (`who`: its type, for messages)
    that accepts the `allowed` formats."""
    if not rows:
        return "?", [(field, "the dataset is empty")]
    renamed = [{spec.columns.get(k, k): v for k, v in r.items()} for r in rows]
    cols = set(renamed[0])
    fmt = detect_format(cols) if spec.format == "auto" else spec.format
    if fmt is None:
        hints = "; ".join(f"{k}: {', '.join(v)}" for k, v in REQUIRED.items() if k in allowed)
        return "?", [
            (
                field,
                f"cannot tell the data format from columns {sorted(cols)}; a `{who}` stage needs one of "
                f"({hints}). Rename columns with `columns: {{their_name: our_name}}` or set `format:`",
            )
        ]
    missing = [c for c in REQUIRED[fmt] if c not in cols]
    if missing:
        return fmt, [(field, f"format `{fmt}` needs column(s) {missing}; the data has {sorted(cols)}")]
    if fmt not in allowed:
        need = "; ".join(f"{k}: {', '.join(REQUIRED[k])}" for k in allowed)
        return fmt, [(field, f"a `{who}` stage takes {', '.join(allowed)} data, not `{fmt}` (columns {need})")]
    if fmt == "messages":
        msgs = renamed[0]["messages"]
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m for m in msgs)):
            return fmt, [(field, "`messages` must be a list of {role, content} mappings")]
    return fmt, []


def file_hash(path: Path, _cache: dict[tuple[str, int, float], str] = {}) -> str:  # noqa: B006 - memo
    """sha256 of a file's content (memoised per process on path, size and mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime)
    if key not in _cache:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _cache[key] = h.hexdigest()
    return _cache[key]


def dataset_identity(spec: Any) -> dict[str, Any]:
    """What a stage's fingerprint records about a dataset: its spec and the content hash of its files.

    Local files count by content, named relative to the dataset path: a moved project keeps its fingerprints."""
    local = [k for k in ("path", "eval_path") if getattr(spec, k) and is_local(getattr(spec, k))]
    ident: dict[str, Any] = {"spec": spec.model_dump(exclude=set(local))}
    for key in local:
        root = Path(getattr(spec, key)).expanduser()
        ident[f"{key}_sha256"] = {
            (f.name if root.is_file() else str(f.relative_to(root))): file_hash(f) for f in data_files(str(root))
        }
    return ident


# ---------------------------------------------------------------- loading (stage processes only)


def load_rows(spec: Any, which: str = "path") -> Any:
    """Load a dataset as a `datasets.Dataset`, with renamed columns and `max_samples` applied."""
    import datasets

    path = getattr(spec, which)
    if is_local(path):
        files = data_files(path)
        ds = datasets.load_dataset(SUFFIXES[files[0].suffix], data_files=[str(f) for f in files], split="train")
    else:
        try:
            ds = datasets.load_dataset(path, spec.subset, split=spec.split)
        except Exception as e:
            raise RecipeError(
                f"cannot load hub dataset `{path}` ({type(e).__name__}); without network use a local file", "datasets"
            ) from None
    renames = {k: v for k, v in spec.columns.items() if k in ds.column_names}
    if renames:
        ds = ds.rename_columns(renames)
    if spec.max_samples and which == "path":
        ds = ds.select(range(min(spec.max_samples, len(ds))))
    return ds


def train_eval_split(spec: Any, seed: int) -> tuple[Any, Any | None]:
    ds = load_rows(spec)
    if spec.eval_path:
        return ds, load_rows(spec, "eval_path")
    if spec.eval_fraction:
        parts = ds.train_test_split(test_size=spec.eval_fraction, seed=seed)
        return parts["train"], parts["test"]
    return ds, None


def mix(parts: list[tuple[Any, float]], seed: int) -> Any:
    """Mixture by weight: weight w takes round(w x rows) rows of a dataset (w > 1 repeats it), shuffled."""
    import datasets

    chosen = []
    for ds, w in parts:
        n = round(w * len(ds))
        idx = [i % len(ds) for i in range(n)]
        chosen.append(ds.select(idx))
    return datasets.concatenate_datasets(chosen).shuffle(seed=seed) if len(chosen) > 1 else chosen[0]


def to_sft(ds: Any, fmt: str, *, chat: bool, loss_on: str, eos: str) -> Any:
    """Convert to one of TRL's SFT formats.

    With loss on completions we hand TRL prompt/completion pairs, so masking works with any chat template
    (multi-turn `messages` train on the final assistant turn; earlier turns are context).
    """

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        if fmt == "text":
            return {"text": row["text"]}
        if fmt == "alpaca":
            prompt, completion = alpaca_pair(row, chat=chat, eos=eos)
        elif fmt == "messages":
            msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
            if loss_on == "all":
                return {"messages": msgs}
            last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
            if last is None:
                raise RecipeError("a `messages` row has no assistant turn to learn from", "data")
            prompt, completion = msgs[:last], [msgs[last]]
        else:  # prompt_completion
            prompt, completion = row["prompt"], row["completion"]
            if isinstance(prompt, str) and isinstance(completion, str) and not completion.endswith(eos):
                completion = completion + eos
        if loss_on == "all":
            if isinstance(prompt, list):
                return {"messages": prompt + completion}
            return {"text": prompt + completion}
        return {"prompt": prompt, "completion": completion}

    return ds.map(convert, remove_columns=ds.column_names, desc=f"formatting {fmt}")


def texts_of(ds: Any, fmt: str, tokenizer: Any, *, completion_only: bool = False) -> list[tuple[str, str]]:
    """(prefix, text) pairs for perplexity; chat data is rendered with the model's chat template.

    With `completion_only`, prefix is the rendered prompt, so only the response tokens are scored (what SFT
    with loss on completions trains); otherwise the prefix is empty and every token counts."""
    chat = bool(tokenizer.chat_template)
    out = []
    for row in ds:
        if fmt == "text":
            out.append(("", row["text"]))
            continue
        full = to_sft_row(row, fmt, chat=chat)
        if isinstance(full, list):
            text = tokenizer.apply_chat_template(full, tokenize=False)
            prefix = tokenizer.apply_chat_template(full[:-1], tokenize=False, add_generation_prompt=True)
        else:
            text = full
            prompt = alpaca_pair(row, chat=False, eos="")[0] if fmt == "alpaca" else row.get("prompt", "")
            prefix = prompt if isinstance(prompt, str) and text.startswith(prompt) else ""
        out.append((prefix if completion_only and text.startswith(prefix) else "", text))
    return out


def to_sft_row(row: dict[str, Any], fmt: str, *, chat: bool) -> Any:
    """One row as a message list (chat models) or one string: used where no trainer formats for us."""
    if fmt == "messages":
        return row["messages"]
    p, c = alpaca_pair(row, chat=chat, eos="") if fmt == "alpaca" else (row["prompt"], row["completion"])
    return p + c if isinstance(p, list) == isinstance(c, list) else str(p) + str(c)


def alpaca_pair(row: dict[str, Any], *, chat: bool, eos: str) -> tuple[Any, Any]:
    """Alpaca as (prompt, completion): one user/assistant turn for chat models, the Alpaca template otherwise."""
    inp = (row.get("input") or "").strip()
    if chat:
        user = row["instruction"].strip() + (f"\n\n{inp}" if inp else "")
        return [{"role": "user", "content": user}], [{"role": "assistant", "content": row["output"]}]
    block = f"### Input:\n{inp}\n\n" if inp else ""
    return ALPACA_TEMPLATE.format(instruction=row["instruction"].strip(), input_block=block), row["output"] + eos


# ---------------------------------------------------------------- preference pairs and prompts


def hh_split(chosen: str, rejected: str) -> tuple[str, str, str]:
    """HH-RLHF full transcripts -> (shared prompt ending in "\\n\\nAssistant:", chosen reply, rejected reply)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n + 1)
    if cut < 0:
        raise RecipeError("an hh_rlhf row has no `\\n\\nAssistant:` turn shared by chosen and rejected", "data")
    cut += len(HH_ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def hh_messages(prompt: str) -> list[dict[str, str]] | None:
    """An HH-style "\\n\\nHuman: .. \\n\\nAssistant: .." prompt as chat messages; None if it is not one."""
    text = prompt.rstrip()
    if not text.lstrip().startswith(HH_HUMAN.strip()):
        return None
    if text.endswith(HH_ASSISTANT.strip()):
        text = text[: -len(HH_ASSISTANT.strip())]
    msgs = []
    for part in ("\n\n" + text.lstrip()).split(HH_HUMAN):
        if not part.strip():
            continue
        user, *replies = part.split(HH_ASSISTANT)
        msgs.append({"role": "user", "content": user.strip()})
        msgs += [{"role": "assistant", "content": r.strip()} for r in replies]
    return msgs if msgs and msgs[-1]["role"] == "user" else None


def preference_row(row: dict[str, Any], fmt: str, *, chat: bool) -> dict[str, Any]:
    """One pair as TRL's {prompt, chosen, rejected}: message lists for chat models, strings otherwise."""
    if fmt == "hh_rlhf":
        prompt, chosen, rejected = hh_split(row["chosen"], row["rejected"])
    elif isinstance(row["chosen"], list) and "prompt" not in row:  # implicit prompt: the shared turns
        shared = 0
        while row["chosen"][shared] == row["rejected"][shared]:
            shared += 1
        prompt, chosen, rejected = row["chosen"][:shared], row["chosen"][shared:], row["rejected"][shared:]
    else:
        prompt, chosen, rejected = row.get("prompt") or "", row["chosen"], row["rejected"]
    if not chat or isinstance(prompt, list):
        if not chat and isinstance(prompt, list):
            raise RecipeError("chat-message pairs need a tokenizer with a chat template", "data")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    msgs = hh_messages(prompt) or [{"role": "user", "content": prompt.strip()}]
    return {
        "prompt": msgs,
        "chosen": [{"role": "assistant", "content": chosen.strip()}],
        "rejected": [{"role": "assistant", "content": rejected.strip()}],
    }


def to_preference(ds: Any, fmt: str, *, chat: bool) -> Any:
    return ds.map(lambda r: preference_row(r, fmt, chat=chat), remove_columns=ds.column_names, desc=f"formatting {fmt}")


def prompt_of(row: dict[str, Any], fmt: str, *, chat: bool) -> Any:
    """The prompt part of any row (online RL samples its own completions): messages or a string."""
    if fmt in ("preference", "hh_rlhf"):
        return preference_row(row, fmt, chat=chat)["prompt"]
    if fmt == "alpaca":
        return alpaca_pair(row, chat=chat, eos="")[0]
    if fmt == "messages":
        msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        while msgs and msgs[-1]["role"] == "assistant":
            msgs.pop()
        return msgs
    prompt = row["prompt"]
    if chat and isinstance(prompt, str):
        return hh_messages(prompt) or [{"role": "user", "content": prompt.strip()}]
    return prompt


def to_prompts(ds: Any, fmt: str, *, chat: bool) -> Any:
    return ds.map(lambda r: {"prompt": prompt_of(r, fmt, chat=chat)}, remove_columns=ds.column_names)
