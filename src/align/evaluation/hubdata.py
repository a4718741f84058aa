"""Task data from a dataset hub: `data: {path: cais/mmlu, config: all, split: test}` in a task file.

The rows are fetched once through `datasets` and kept as JSONL under `<align cache>/taskdata/` (keyed by
the hub id, config, split and revision), in the layout the local loaders already read: a generation task's one
JSONL file, or MMLU's `{"test": ..., "dev": ...}` files of `{subject, question, choices, answer}` records (the
`cais/mmlu` schema). Afterwards no network is needed. Without network and without that copy, one clear message
says what to do, in seconds (the hub is asked once, with a timeout) instead of after retries.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class HubDataError(ValueError):
    """Task data that cannot be fetched (offline, unknown id, missing split): a clear message for exit 2."""


# a name ending like a data file is a local path that is missing, not a hub id (`data/items.jsonl`)
_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet", ".arrow", ".gz", ".yaml", ".yml")


def is_hub_id(path: str) -> bool:
    """`owner/name` that is not a file or folder here (a relative local path wins), nor named like a data file."""
    return (
        bool(_HUB_ID.match(path))
        and not path.lower().endswith(_FILE_SUFFIXES)
        and not Path(path).expanduser().exists()
        and not path.startswith((".", "~"))
    )


def cache_file(path: str, config: str | None, split: str, revision: str | None) -> Path:
    from align.models import cache_dir

    key = hashlib.sha256(json.dumps([path, config, split, revision]).encode()).hexdigest()[:24]
    safe = re.sub(r"[^\w.\-]", "_", path)
    return cache_dir() / "taskdata" / f"{safe}-{key}" / f"{split}.jsonl"


def fetch(path: str, config: str | None, split: str, revision: str | None = None, *, where: str = "data") -> Path:
    """The split as a local JSONL file (fetched and converted once)."""
    out = cache_file(path, config, split, revision)
    if out.is_file():
        return out
    what = f"`{path}`" + (f" (config {config})" if config else "") + f", split {split}"
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise HubDataError(
            f"{where}: task data {what} is not in align's cache ({out.parent}) and HF_HUB_OFFLINE is set; run once "
            "with network, or point `data.path` at local files"
        )
    _reachable(path, what, where)
    try:
        import datasets

        ds = datasets.load_dataset(path, config, split=split, revision=revision)
    except Exception as e:  # datasets raises many kinds: name the request and the library's first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubDataError(f"{where}: cannot load task data {what}: {first}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in ds:
            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    tmp.replace(out)
    return out


def _reachable(path: str, what: str, where: str) -> None:
    """One quick question to the hub, so that no network fails in seconds with a message, not after retries."""
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(path, timeout=10)
    except Exception as e:
        raise HubDataError(
            f"{where}: cannot reach the hub for task data {what} ({type(e).__name__}); without network, download "
            "it elsewhere once (it is kept in align's cache) or point `data.path` at local files"
        ) from None


def mmlu_files(path: str, config: str | None, revision: str | None, *, where: str = "data") -> dict[str, Path]:
    """MMLU from the hub (`cais/mmlu`, config `all` or one subject): its test and dev splits as JSONL with a
    `subject` field, which `align.evaluation.mmlu.load_mmlu` reads as a `{"test", "dev"}` mapping."""
    return {split: fetch(path, config or "all", split, revision, where=where) for split in ("test", "dev")}


def rows(file: Path) -> list[dict[str, Any]]:
    with file.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
