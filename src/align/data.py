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

import contextlib
import csv
import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.errors import RecipeError, did_you_mean

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
OPTIONAL = {"alpaca": ("input",), "preference": ("prompt",)}  # columns a format uses when they are there
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
    if spec.format == "auto" and fmt == "hh_rlhf" and isinstance(renamed[0].get("chosen"), list):
        fmt = "preference"  # message-list pairs without `prompt`: the shared turns are the prompt
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
        why = "it is empty" if msgs == [] else message_problem(msgs)
        if why:
            return fmt, [(field, f"`messages` must be a list of {{role, content}} mappings: {why}")]
    return fmt, []


MEMO_MIN_BYTES = 8 << 20  # smaller files are hashed each time (milliseconds); larger ones are remembered on disk


def file_hash(path: Path, _cache: dict[tuple[str, int, int], str] = {}) -> str:  # noqa: B006 - memo
    """sha256 of a file's content. Memoised per process, and for large files on disk (`<cache>/filehash/`), on
    path, inode, size and mtime; as git does against "racy" files, a memo is trusted only for a file last changed
    well before the memo was written, so an edit in the same clock tick that keeps the size is still seen."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _cache:
        return _cache[key]
    memo = _hash_memo(key) if st.st_size >= MEMO_MIN_BYTES else None
    ident = {"path": key[0], "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        rec = json.loads(memo.read_text()) if memo else None
    except (OSError, ValueError):
        rec = None
    if isinstance(rec, dict) and rec.get("ident") == ident and st.st_mtime_ns < rec.get("written_ns", 0) - 2 * 10**9:
        _cache[key] = rec["sha256"]
        return _cache[key]
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    _cache[key] = h.hexdigest()
    if memo is not None:
        with contextlib.suppress(OSError):
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"ident": ident, "sha256": _cache[key], "written_ns": time.time_ns()}))
            tmp.replace(memo)
    return _cache[key]


def _hash_memo(key: tuple[str, int, int]) -> Path | None:
    try:
        from align.models import cache_dir

        return cache_dir() / "filehash" / f"{hashlib.sha256(key[0].encode()).hexdigest()[:32]}.json"
    except Exception:
        return None


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


# ---------------------------------------------------------------- full-file checks (plan time, cached)

SCAN_VERSION = 3  # bump when the checks change: cached results of older checks are then ignored
DROP_LIMIT = 0.10  # more than this share of unusable rows is refused (below it, they are dropped with a warning)
SHOW = 5  # offending rows named in a message
# what the columns a format uses must hold: text (a string) or turns (a string or a list of messages)
COLUMN_KINDS = {
    "text": "text",
    "instruction": "text",
    "input": "text",
    "output": "text",
    "prompt": "turns",
    "completion": "turns",
    "chosen": "turns",
    "rejected": "turns",
    "messages": "messages",
}


@dataclass
class Scan:
    """What reading a dataset in full found: its format, row count, problems (refusals) and warnings."""

    format: str = "?"
    rows: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (field below the dataset, message)
    warnings: list[str] = field(default_factory=list)


class _Bad(Exception):
    """One unreadable place in a file; becomes a problem naming the file and line."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"`{name}` is not JSON (the loader rejects it; write null or a number)")


def _json(text: str, *, line: bool = False) -> Any:
    """json.loads, or _Bad saying where (`line`: with the line number, for a whole file)."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        hint = "; a file starting with `[` is read as one JSON array" if line and e.msg == "Extra data" else ""
        at = f"line {e.lineno}: " if line else ""
        sep = " " if e.msg.endswith(" at") else " at "
        raise _Bad(f"{at}invalid JSON ({e.msg}{sep}column {e.colno}){hint}") from None
    except ValueError as e:
        raise _Bad(f"invalid JSON ({e})") from None


def _decoded_lines(f: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a file read as UTF-8 line by line (a leading BOM dropped, as the loader does)."""
    with f.open("rb") as fh:
        for n, raw in enumerate(fh, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _Bad(f"line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    return "list" if isinstance(v, list) else "object"


def _first_char(f: Path) -> str:
    with f.open("rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    return head[:1].decode("latin-1")


def iter_rows(f: Path) -> Iterator[tuple[str, Any]]:
    """Every row of one data file as (where, row): `line 21` (jsonl, csv), `item 3` (a .json array), `row 7`
    (parquet). Raises _Bad naming the line for what the loader would choke on."""
    if f.suffix == ".csv":
        yield from _csv_rows(f)
    elif f.suffix == ".parquet":
        yield from _parquet_rows(f)
    elif _first_char(f) == "[":
        yield from _array_rows(f)
    else:
        for n, line in _decoded_lines(f):
            if not line.strip():
                continue
            try:
                row = _json(line)
            except _Bad as e:
                if n == 1 and f.suffix == ".json":
                    whole = _whole_object(f)
                    if whole:
                        raise _Bad(whole) from None
                raise _Bad(f"line {n}: {e}") from None
            if not isinstance(row, dict):
                raise _Bad(f"line {n}: a row must be a JSON object {{column: value}}, not a {_kind(row)}")
            yield f"line {n}", row


def _whole_object(f: Path) -> str | None:
    """A .json file holding one object (not rows) says so, instead of "invalid JSON at line 1"."""
    if f.stat().st_size > 256 << 20:
        return None
    try:
        data = json.loads(f.read_bytes().decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(data, dict):
        return (
            f"holds one JSON object with keys {sorted(data)[:5]}, not rows: write one object per line (JSON Lines) "
            "or an array of objects"
        )
    return None


def _array_rows(f: Path) -> Iterator[tuple[str, Any]]:
    try:
        text = f.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _Bad(f"not UTF-8 text (byte offset {e.start})") from None
    data = _json(text, line=True)
    kinds = {_kind(x) for x in data}
    if kinds == {"string"}:  # the loader reads an array of strings as a `text` column
        for i, x in enumerate(data, 1):
            yield f"item {i}", {"text": x}
        return
    for i, x in enumerate(data, 1):
        if not isinstance(x, dict):
            raise _Bad(
                f"item {i} of the array is a {_kind(x)}, not an object {{column: value}}; "
                "a .json dataset is an array of objects (or of strings, read as `text`)"
            )
        yield f"item {i}", x


def _csv_rows(f: Path) -> Iterator[tuple[str, Any]]:
    lines = (text for _, text in _decoded_lines(f))
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
        if header is None:
            return
        if len(set(header)) != len(header) or any(not h.strip() for h in header):
            raise _Bad(f"line 1: the header {header} has empty or repeated column names")
        start = reader.line_num + 1
        for values in reader:
            if values:  # blank lines are skipped, as the loader does
                if len(values) != len(header):
                    raise _Bad(
                        f"line {start}: {len(values)} field(s) where the header has {len(header)}; "
                        "quote values that hold commas"
                    )
                # the csv loader reads an empty cell as null
                yield f"line {start}", {h: (v if v != "" else None) for h, v in zip(header, values, strict=True)}
            start = reader.line_num + 1
    except csv.Error as e:
        raise _Bad(f"line {reader.line_num}: not valid CSV ({e})") from None


def _parquet_rows(f: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
        n = 0
        for batch in pf.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield f"row {n}", row
    except (pa.ArrowException, OSError) as e:
        raise _Bad(f"not a readable parquet file ({str(e).splitlines()[0]})") from None


def message_problem(v: Any) -> str | None:
    """What keeps a value from being a list of chat messages ({role, content}, both strings), or None."""
    if not isinstance(v, list):
        return f"it is a {_kind(v)}, not a list"
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            return f"its message {i} is a {_kind(m)}, not a {{role, content}} mapping"
        for key in ("role", "content"):
            if key not in m:
                return f"its message {i} has no `{key}`"
            if not isinstance(m[key], str):
                return f"its message {i} has a {_kind(m[key])} `{key}`, not a string"
        if m["role"] not in CHAT_ROLES:  # a typo ("usr") renders as a turn of its own and trains on it silently
            from align.errors import did_you_mean

            return (
                f"its message {i} has role `{m['role']}`{did_you_mean(m['role'], CHAT_ROLES)}; chat templates "
                f"know {', '.join(CHAT_ROLES)}"
            )
    return None


CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


def type_problem(col: str, v: Any) -> str | None:
    """What is wrong with the value of column `col` of a format (None and missing values count as unusable rows)."""
    kind = COLUMN_KINDS.get(col)
    if v is None or kind is None:
        return None
    if kind == "text":
        return None if isinstance(v, str) else f"`{col}` is a {_kind(v)}, not a string"
    if kind == "turns" and isinstance(v, str):
        return None
    if kind == "turns" and not isinstance(v, list):
        return f"`{col}` is a {_kind(v)}, not a string or a list of {{role, content}} messages"
    why = message_problem(v)
    return f"`{col}`: {why}" if why else None


def _blank(v: Any) -> bool:
    return (isinstance(v, str) and not v.strip()) or (isinstance(v, list) and not v)


PROMPT_PART = {"prompt_completion": ["prompt"], "alpaca": ["instruction"]}  # what online RL reads of a row


def row_issue(row: dict[str, Any], fmt: str, *, need_assistant: bool = False, prompts_only: bool = False) -> str | None:
    """Why a row (columns renamed) is unusable and is dropped before training, or None: a null, missing or
    empty value in a column the format needs, identical chosen and rejected, a pair with no shared prompt.
    With `prompts_only` (online RL samples its own completions) only what makes the prompt counts."""
    implicit = fmt == "preference" and row.get("prompt") is None and isinstance(row.get("chosen"), list)
    cols = REQUIRED.get(fmt, [])
    if prompts_only:
        cols = PROMPT_PART.get(fmt, ["prompt"] if fmt == "preference" and not implicit else cols)
    for col in cols:
        v = row.get(col)
        if v is None:
            return f"null or missing `{col}`"
        if _blank(v):
            return f"empty `{col}`"
    msgs = row.get("messages")
    learns = isinstance(msgs, list) and any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs)
    if fmt == "messages" and need_assistant and not learns:
        return "no assistant turn to learn from"
    if fmt not in PAIR_FORMATS or (prompts_only and not implicit and fmt != "hh_rlhf"):
        return None
    chosen, rejected = row["chosen"], row["rejected"]
    if chosen == rejected and not (prompts_only and fmt == "hh_rlhf"):
        return "chosen == rejected"
    if fmt == "hh_rlhf" and isinstance(chosen, str) and isinstance(rejected, str):
        try:
            hh_split(chosen, rejected)
        except RecipeError:
            return "no `\\n\\nAssistant:` turn shared by chosen and rejected"
    if implicit and isinstance(rejected, list):
        shared = next((i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b), None)
        if shared is None:  # one is the other plus turns: nothing left to compare
            return "one of chosen/rejected repeats the other's turns and adds more"
    return None


def drop_unusable(ds: Any, fmt: str, *, need_assistant: bool = False, prompts_only: bool = False) -> Any:
    """The rows `align plan` counted as unusable are left out (it refuses when they are too many)."""
    return ds.filter(
        lambda r: row_issue(r, fmt, need_assistant=need_assistant, prompts_only=prompts_only) is None,
        desc="dropping unusable rows",
    )


class _Tally:
    """Rows grouped by what is wrong with them: a count per reason and the first few places."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.places: dict[str, list[tuple[str, str]]] = {}

    def add(self, why: str, file: str, place: str) -> None:
        self.count[why] = self.count.get(why, 0) + 1
        if len(self.places.setdefault(why, [])) < SHOW:
            self.places[why].append((file, place))

    def total(self) -> int:
        return sum(self.count.values())

    def render(self) -> str:
        return "; ".join(f"{why}: {_places(self.places[why], n)}" for why, n in self.count.items())


def _places(places: list[tuple[str, str]], total: int) -> str:
    """[(a.jsonl, line 4), (a.jsonl, line 9)] -> "a.jsonl lines 4, 9" (+ how many more)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for file, place in places:
        kind, _, num = place.partition(" ")
        groups.setdefault((file, kind), []).append(num)
    text = ", ".join(f"{f} {k}{'s' if len(n) > 1 else ''} {', '.join(n)}" for (f, k), n in groups.items())
    return text + (f" (+{total - len(places)} more)" if total > len(places) else "")


def _scan_files(files: list[Path], spec: Any, allowed: tuple[str, ...], who: str, need_assistant: bool) -> Scan:
    prompts_only = "prompt" in allowed  # an online RL stage: it reads only the prompt of each row
    scan = Scan()
    columns: dict[Path, set[str]] = {}
    kinds: dict[str, tuple[str, str]] = {}  # column -> (kind, first place) of its values across the dataset
    fmt: str | None = None
    wrong, unusable = _Tally(), _Tally()
    root = Path(os.path.commonpath([f.parent for f in files]))
    raw_columns: set[str] = set()  # as the files name them, before `columns:` renames
    for f in files:
        name = str(f.relative_to(root))  # a folder's files by their place in it
        cols: set[str] = set()
        try:
            for place, raw in iter_rows(f):
                row = {spec.columns.get(k, k): v for k, v in raw.items()}
                cols |= set(row)
                raw_columns |= set(raw)
                scan.rows += 1
                where = f"{name} {place}"
                if fmt is None:
                    fmt, found = check_format([raw], spec, allowed, "", who=who)
                    scan.format = fmt
                    if found:
                        scan.problems += [(p, f"{where}: {m}") for p, m in found]
                        return scan
                for col, v in row.items():
                    k = _kind(v)
                    if k == "null":
                        continue
                    seen = kinds.setdefault(col, (k, where))
                    if seen[0] != k:
                        scan.problems.append(
                            (
                                "",
                                f"column `{col}` holds a {seen[0]} at {seen[1]} but a {k} at {where}; the loader "
                                "needs one kind of value per column",
                            )
                        )
                        return scan
                    if col in REQUIRED[fmt] or col in OPTIONAL.get(fmt, ()):
                        why = type_problem(col, v)
                        if why:
                            wrong.add(why, name, place)
                issue = row_issue(row, fmt, need_assistant=need_assistant, prompts_only=prompts_only)
                if issue:
                    unusable.add(issue, name, place)
        except _Bad as e:
            scan.problems.append(("", f"{name} {e}"))
            return scan
        except OSError as e:
            scan.problems.append(("", f"cannot read {name} ({e.strerror or e})"))
            return scan
        columns[f] = cols
    if len(set(map(frozenset, columns.values()))) > 1:
        (fa, ca), (fb, cb) = next((a, b) for a, b in itertools.combinations(columns.items(), 2) if a[1] != b[1])
        scan.problems.append(
            (
                "",
                f"the files of this folder have different columns: {fa.relative_to(root)} has {sorted(ca)}, "
                f"{fb.relative_to(root)} has {sorted(cb)}; one set of columns per dataset",
            )
        )
        return scan
    if scan.rows == 0:
        scan.problems.append(
            ("", f"the dataset is empty: no rows in {', '.join(str(f.relative_to(root)) for f in files)}")
        )
        return scan
    absent = [c for c in spec.columns if c not in raw_columns]
    if absent:  # the loader renames only the columns it finds: a misspelt one would be ignored without a word
        scan.problems.append(
            (
                f"columns.{absent[0]}",
                f"`{absent[0]}` is not a column of the data{did_you_mean(absent[0], sorted(raw_columns))}; "
                f"its columns: {', '.join(sorted(raw_columns))}",
            )
        )
        return scan
    if wrong.total():
        scan.problems.append(("", f"{wrong.total()} value(s) of the wrong type — {wrong.render()}"))
        return scan
    total = unusable.total()
    if total:
        share = total / scan.rows
        if total == scan.rows or share > DROP_LIMIT:
            scan.problems.append(
                (
                    "",
                    f"{total} of {scan.rows} rows are unusable ({share:.0%}; at most {DROP_LIMIT:.0%} may be "
                    f"dropped) — {unusable.render()}; fix or remove them",
                )
            )
        else:
            scan.warnings.append(f"{total} of {scan.rows} rows are unusable and will be dropped — {unusable.render()}")
    return scan


def _cache_file(key: str) -> Path:
    from align.models import cache_dir

    return cache_dir() / "datacheck" / f"{key}.json"


def scan_dataset(
    spec: Any, allowed: tuple[str, ...], *, who: str = "this", which: str = "path", need_assistant: bool = False
) -> Scan:
    """Read every row of a local dataset (`spec.path` or `spec.eval_path`) as the stage will: parse errors name
    the file and line, the columns the format uses are type-checked, unusable rows are counted (a warning) or,
    above DROP_LIMIT, refused. The result is cached on disk (`<align cache>/datacheck/`) under a hash of the
    files' contents and of what the check depends on, so planning the same files again reads nothing but the
    hashes."""
    try:
        files = data_files(getattr(spec, which))
    except RecipeError as e:
        return Scan(problems=[(which if p == "path" else p, m) for p, m in e.problems])
    try:
        ident = {
            "v": SCAN_VERSION,
            "files": [[f.name, file_hash(f)] for f in files],
            "format": spec.format,
            "columns": spec.columns,
            "allowed": list(allowed),
            "who": who,
            "need_assistant": need_assistant,
        }
    except OSError as e:
        return Scan(problems=[(which, f"cannot read {e.filename}: {e.strerror}")])
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    cache = _cache_file(key)
    try:
        hit = json.loads(cache.read_text())
        return Scan(hit["format"], hit["rows"], [tuple(p) for p in hit["problems"]], hit["warnings"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    scan = _scan_files(files, spec, allowed, who, need_assistant)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(scan.__dict__))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only cache only costs the next plan a re-read
    return scan


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

    ds = drop_unusable(ds, fmt, need_assistant=loss_on != "all")
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
    ds = drop_unusable(ds, fmt)
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
    ds = drop_unusable(ds, fmt, prompts_only=True)
    return ds.map(lambda r: {"prompt": prompt_of(r, fmt, chat=chat)}, remove_columns=ds.column_names)
