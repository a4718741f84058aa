"""MMLU (letter format) with lm-evaluation-harness parity and a KV-cached fast scorer.

Parity target: lm-eval 0.4.13's ``mmlu`` task, default variant (``tasks/mmlu/default``):

* context = ``"The following are multiple choice questions (with answers) about {subject}.\\n\\n"``
  + the first ``k`` dev rows, each ``doc_to_text + " " + letter``, joined and followed by
  ``"\\n\\n"`` + the test row's ``doc_to_text``; ``doc_to_text`` is
  ``"{question.strip()}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:"`` (choices are *not*
  stripped);
* continuations ``" A"`` .. ``" D"`` (target delimiter ``" "``), scored by summed log-likelihood,
  ``argmax`` (first index on ties) is the prediction; metric ``acc``;
* tokenization as ``HFLM._encode_pair``: trailing whitespace of the context moves to the
  continuation, ``context_enc = enc(context)``, ``continuation_enc = enc(context + cont)[len(context_enc):]``,
  where ``enc`` uses the tokenizer's default special tokens unless the text already starts with
  the BOS string (``HFLM.tok_encode`` with ``add_bos_token=None``).

Speed: every question of a subject shares the description + few-shot prefix, so its KV cache is
computed once per subject and only the per-question suffix is run. The cached prefix is the
longest common prefix of the *token ids* of all contexts (not the tokenized prefix string: BPE
merges across the ``"\\n\\n"`` boundary differ), so the scored token sequences are exactly the ones
lm-eval scores. When the four continuations are single tokens (the usual case) one forward over
the question suffix scores all four letters from the last position's logits.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from align import distributed
from align.evaluation.metrics import mean_stderr, pooled_stderr, weighted_mean

LETTERS: tuple[str, str, str, str] = ("A", "B", "C", "D")
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class MMLUQuestion:
    """One multiple-choice item; ``answer`` is the index 0-3 of the correct choice."""

    question: str
    choices: tuple[str, str, str, str]
    answer: int


@dataclass
class MMLUSubject:
    """A subject's test questions and its few-shot (dev) pool, in file order."""

    name: str
    test: list[MMLUQuestion]
    dev: list[MMLUQuestion] = field(default_factory=list)

    @property
    def description(self) -> str:
        return subject_description(self.name)


def subject_description(subject: str) -> str:
    """lm-eval's per-subject ``description`` (underscores become spaces)."""
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def _parse_answer(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 4:
        return value
    if isinstance(value, str) and value.strip().upper() in LETTERS:
        return LETTERS.index(value.strip().upper())
    if isinstance(value, str) and value.strip() in {"0", "1", "2", "3"}:
        return int(value.strip())
    raise ValueError(f"{where}: answer must be 0-3 or A-D, got {value!r}")


def _read_csv(path: Path) -> list[MMLUQuestion]:
    """Original Hendrycks layout: no header, ``question,A,B,C,D,answer-letter``."""
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            if len(row) != 6:
                raise ValueError(f"{path}:{line_no}: expected 6 columns (question,A,B,C,D,answer), got {len(row)}")
            rows.append(MMLUQuestion(row[0], tuple(row[1:5]), _parse_answer(row[5], f"{path}:{line_no}")))
    return rows


def _record_to_question(rec: Any, where: str) -> MMLUQuestion:
    """``cais/mmlu`` record: ``{question, choices: [4 strings], answer: 0-3}``."""
    if not isinstance(rec, dict):
        raise TypeError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for key in ("question", "choices", "answer"):
        if key not in rec:
            raise ValueError(f"{where}: missing field {key!r} (have {sorted(rec)})")
    choices = rec["choices"]
    if not isinstance(choices, list) or len(choices) != 4:
        raise ValueError(f"{where}: field 'choices' must be a list of 4 strings, got {choices!r}")
    return MMLUQuestion(
        str(rec["question"]),
        tuple(str(c) for c in choices),
        _parse_answer(rec["answer"], where),
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: invalid JSON ({e})") from e
                out.append({"__where__": f"{path}:{line_no}", **rec})
    return out


def _read_split_file(path: Path) -> list[MMLUQuestion]:
    if path.suffix == ".csv":
        return _read_csv(path)
    return [_record_to_question(r, r.pop("__where__")) for r in _read_jsonl(path)]


def _find_split_file(root: Path, split: str, subject: str, exts: Sequence[str]) -> Path | None:
    for ext in exts:
        p = root / split / f"{subject}_{split}.{ext}"
        if p.is_file():
            return p
    return None


def load_mmlu(
    source: str | Path | Mapping[str, str | Path],
    subjects: Sequence[str] | None = None,
    *,
    limit: int | None = None,
    require_dev: bool = True,
    file_format: Literal["auto", "csv", "jsonl"] = "auto",
) -> dict[str, MMLUSubject]:
    """Load MMLU subjects from the original CSV layout or ``cais/mmlu``-style JSONL.

    ``source`` is either
      * a folder with ``test/<subject>_test.{csv,jsonl}`` and ``dev/<subject>_dev.{csv,jsonl}``
        (CSV: original release, no header, answer letter; JSONL: ``{question, choices, answer}``),
        subjects defaulting to every ``test/*_test.*`` file; or
      * ``{"test": file.jsonl, "dev": file.jsonl}``: single JSONL files whose records also carry a
        ``subject`` field (a ``cais/mmlu`` "all" export).

    ``limit`` keeps the first N test questions per subject (like lm-eval's ``--limit``);
    ``file_format`` restricts the folder layout to one extension (``auto``: csv, then jsonl).
    Missing files or fields raise with the file (and line) named.
    """
    out: dict[str, MMLUSubject] = {}
    if isinstance(source, Mapping):
        unknown = set(source) - {"test", "dev"}
        if unknown or "test" not in source:
            raise ValueError(f"mapping source needs keys 'test' (and 'dev'), got {sorted(source)}")
        by_split: dict[str, dict[str, list[MMLUQuestion]]] = {}
        for split, file in source.items():
            path = Path(file)
            if not path.is_file():
                raise FileNotFoundError(f"MMLU {split} file not found: {path}")
            groups: dict[str, list[MMLUQuestion]] = {}
            for rec in _read_jsonl(path):
                where = rec.pop("__where__")
                if "subject" not in rec:
                    raise ValueError(f"{where}: missing field 'subject'")
                groups.setdefault(rec["subject"], []).append(_record_to_question(rec, where))
            by_split[split] = groups
        names = list(subjects) if subjects is not None else sorted(by_split["test"])
        for name in names:
            if name not in by_split["test"]:
                raise ValueError(f"subject {name!r} has no rows in {source['test']}")
            dev = by_split.get("dev", {}).get(name, [])
            if require_dev and not dev:
                raise ValueError(f"subject {name!r} has no dev rows in {source.get('dev')}")
            out[name] = MMLUSubject(name, by_split["test"][name][:limit], dev)
        return out

    exts = ("csv", "jsonl") if file_format == "auto" else (file_format,)
    pattern = "|".join(exts)
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"MMLU folder not found: {root}")
    if subjects is None:
        found = [p for ext in exts for p in (root / "test").glob(f"*_test.{ext}")]
        subjects = sorted({p.name.rsplit("_test.", 1)[0] for p in found})
        if not subjects:
            raise FileNotFoundError(f"no test/<subject>_test.{pattern} files under {root}")
    for name in subjects:
        test_file = _find_split_file(root, "test", name, exts)
        if test_file is None:
            raise FileNotFoundError(f"MMLU test file not found: {root / 'test' / name}_test.{pattern}")
        dev_file = _find_split_file(root, "dev", name, exts)
        if dev_file is None and require_dev:
            raise FileNotFoundError(f"MMLU dev file not found: {root / 'dev' / name}_dev.{pattern}")
        dev = _read_split_file(dev_file) if dev_file else []
        out[name] = MMLUSubject(name, _read_split_file(test_file)[:limit], dev)
    return out


# --------------------------------------------------------------------------- prompts


def format_question(q: MMLUQuestion, with_answer: bool = False) -> str:
    """lm-eval ``doc_to_text`` (question stripped, choices verbatim), plus `` X`` if answered."""
    c = q.choices
    text = f"{q.question.strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
    return text + TARGET_DELIMITER + LETTERS[q.answer] if with_answer else text


def fewshot_prefix(subject: MMLUSubject, num_fewshot: int) -> str:
    """Description plus the first ``num_fewshot`` dev rows: the part shared by all questions."""
    if num_fewshot > len(subject.dev):
        raise ValueError(f"{subject.name}: num_fewshot={num_fewshot} but only {len(subject.dev)} dev rows")
    shots = "".join(format_question(q, with_answer=True) + FEWSHOT_DELIMITER for q in subject.dev[:num_fewshot])
    return subject.description + shots


def build_prompt(subject: MMLUSubject, question: MMLUQuestion, num_fewshot: int = 5) -> str:
    """Full context string for one test question (ends with ``"Answer:"``)."""
    return fewshot_prefix(subject, num_fewshot) + format_question(question)


# --------------------------------------------------------------------------- tokenization


def _bos_string(tokenizer: Any) -> str | None:
    """lm-eval's ``prefix_token_id`` decoded (BOS, else EOS)."""
    tok_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return tokenizer.decode([tok_id]) if tok_id is not None else None


def _encode_many(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool | None) -> list[list[int]]:
    """Batch version of lm-eval ``HFLM.tok_encode`` (``add_special_tokens`` = its ``add_bos_token``)."""
    bos = _bos_string(tokenizer) if add_special_tokens is None else None
    groups: dict[bool | None, list[int]] = {}
    for i, t in enumerate(texts):
        flag = add_special_tokens
        if flag is None and bos and t.startswith(bos):
            flag = False
        groups.setdefault(flag, []).append(i)
    out: list[list[int]] = [[] for _ in texts]
    for flag, idx in groups.items():
        kwargs = {} if flag is None else {"add_special_tokens": flag}
        enc = tokenizer([texts[i] for i in idx], **kwargs)["input_ids"]
        for i, ids in zip(idx, enc, strict=True):
            out[i] = list(ids)
    return out


def encode_pairs(
    tokenizer: Any,
    contexts: Sequence[str],
    continuation_sets: Sequence[Sequence[str]],
    add_special_tokens: bool | None = None,
) -> list[tuple[list[int], list[list[int]]]]:
    """lm-eval ``_encode_pair`` for each context and each of its continuations."""
    ctx_texts, whole_texts = [], []
    for ctx, conts in zip(contexts, continuation_sets, strict=True):
        n_spaces = len(ctx) - len(ctx.rstrip())
        moved = ctx[len(ctx) - n_spaces :] if n_spaces else ""
        base = ctx[: len(ctx) - n_spaces] if n_spaces else ctx
        ctx_texts.append(base)
        whole_texts.extend(base + moved + c for c in conts)
    ctx_ids = _encode_many(tokenizer, ctx_texts, add_special_tokens)
    whole_ids = _encode_many(tokenizer, whole_texts, add_special_tokens)
    out, k = [], 0
    for ids, conts in zip(ctx_ids, continuation_sets, strict=True):
        cont_ids = [whole_ids[k + j][len(ids) :] for j in range(len(conts))]
        k += len(conts)
        if not ids or any(not c for c in cont_ids):
            raise ValueError("empty context or continuation after tokenization")
        out.append((ids, cont_ids))
    return out


# --------------------------------------------------------------------------- scoring


@dataclass
class _Row:
    """One forward row: ``ids`` after the cached prefix; each target ``(question, choice, cont)``
    is scored on the last ``len(cont)`` positions of the row."""

    ids: list[int]
    targets: list[tuple[int, int, list[int]]]


def _plan_rows(
    encoded: Sequence[tuple[list[int], list[list[int]]]],
) -> tuple[list[int], list[_Row], int]:
    """Pick the shared prefix (longest common token prefix) and build the suffix rows."""
    ctxs = [ctx for ctx, _ in encoded]
    common = min(len(c) for c in ctxs) - 1  # keep >= 1 suffix token per row
    first = ctxs[0]
    for ctx in ctxs[1:]:
        n = 0
        limit = min(common, len(ctx))
        while n < limit and ctx[n] == first[n]:
            n += 1
        common = n
    prefix = first[:common]
    rows, n_fast = [], 0
    for qi, (ctx, conts) in enumerate(encoded):
        if all(len(c) == 1 for c in conts):
            rows.append(_Row(ctx[common:], [(qi, ci, c) for ci, c in enumerate(conts)]))
            n_fast += 1
        else:  # multi-token continuation: one row per choice, scored like lm-eval
            for ci, c in enumerate(conts):
                rows.append(_Row((ctx + c)[common:-1], [(qi, ci, c)]))
    return prefix, rows, n_fast


def _length_batches(rows: Sequence[_Row], batch_size: int, max_padding: float) -> list[list[_Row]]:
    """Longest-first batches of at most ``batch_size`` rows; a batch is also closed when adding
    the next row would make padding exceed ``max_padding`` of its real tokens (suffix lengths
    vary a lot within a subject, and padded tokens cost as much as real ones)."""
    batches: list[list[_Row]] = []
    cur: list[_Row] = []
    real = 0
    for row in sorted(rows, key=lambda r: -len(r.ids)):
        n = len(row.ids)
        if cur and (len(cur) == batch_size or len(cur[0].ids) * (len(cur) + 1) > (real + n) * (1 + max_padding)):
            batches.append(cur)
            cur, real = [], 0
        cur.append(row)
        real += n
    return batches + ([cur] if cur else [])


@contextmanager
def _native_gqa_sdpa(device: torch.device) -> Iterator[None]:
    """On CPU, let transformers pass grouped KV heads straight to SDPA (``enable_gqa``) instead
    of materialising repeated K/V for the whole cached prefix (~15-20% faster here). transformers
    only does this without a mask by default because CUDA kernels fall back to the math path;
    on CPU the masked GQA path is fine. Scoped: the variable is restored afterwards."""
    key = "TRANSFORMERS_SDPA_FORCE_GQA"
    if device.type != "cpu" or key in os.environ:
        yield
        return
    os.environ[key] = "1"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class _PrefixScorer:
    """Runs suffix rows against a prefix KV cache computed once; the cache tensors are never
    mutated (each batch gets a fresh ``DynamicCache`` built from expanded views)."""

    def __init__(self, model: Any, prefix: list[int], device: torch.device, pad_id: int) -> None:
        from transformers import DynamicCache

        self.model, self.device, self.pad_id = model, device, pad_id
        self._cache_cls = DynamicCache
        self.prefix_len = len(prefix)
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.use_logits_to_keep = True
        if prefix:
            ids = torch.tensor([prefix], device=device)
            kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": True}
            try:  # logits of the prefix are not needed: skip the LM head where supported
                out = model(**kwargs, logits_to_keep=1)
            except TypeError:
                out = model(**kwargs)
            self.kv = [(k, v) for k, v, *_ in out.past_key_values]

    def _cache(self, batch: int) -> Any:
        data = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.kv]
        return self._cache_cls(ddp_cache_data=data, config=self.model.config)

    def logprobs(self, rows: Sequence[_Row]) -> torch.Tensor:
        """Log-softmax (float32) over the last ``keep`` positions, rows left-padded: [B, keep, V]."""
        width = max(len(r.ids) for r in rows)
        keep = max(len(c) for r in rows for _, _, c in r.targets)
        b, p = len(rows), self.prefix_len
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, p + width), dtype=torch.long)
        mask[:, :p] = 1
        pos = torch.full((b, width), p, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.ids)
            ids[i, width - n :] = torch.tensor(r.ids)
            mask[i, p + width - n :] = 1
            pos[i, width - n :] = torch.arange(p, p + n)
        kwargs: dict[str, Any] = {
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "position_ids": pos.to(self.device),
            "use_cache": True,
        }
        if self.kv:
            kwargs["past_key_values"] = self._cache(b)
        if self.use_logits_to_keep:
            try:
                logits = self.model(**kwargs, logits_to_keep=keep).logits
            except TypeError:  # model without `logits_to_keep`: compute all, slice below
                self.use_logits_to_keep = False
                if self.kv:
                    kwargs["past_key_values"] = self._cache(b)
                logits = self.model(**kwargs).logits
        else:
            logits = self.model(**kwargs).logits
        return torch.log_softmax(logits[:, -keep:].float(), dim=-1)


@dataclass(frozen=True)
class Score:
    """Accuracy (0-1) with lm-eval's standard error and the number of questions."""

    accuracy: float
    stderr: float
    n: int


@dataclass(frozen=True)
class MMLUPrediction:
    """Per-question outcome, kept for parity checks against lm-eval's ``--log_samples``."""

    subject: str
    index: int
    loglikelihoods: tuple[float, float, float, float]
    prediction: int
    answer: int

    @property
    def correct(self) -> bool:
        return self.prediction == self.answer


@dataclass
class MMLUResult:
    """Per-subject and size-weighted aggregate accuracy, plus every prediction."""

    per_subject: dict[str, Score]
    aggregate: Score
    predictions: list[MMLUPrediction]
    num_fewshot: int
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for p in d["predictions"]:
            p["correct"] = p["prediction"] == p["answer"]
        return d


def evaluate_mmlu(
    model: Any,
    tokenizer: Any,
    subjects_data: Mapping[str, MMLUSubject],
    num_fewshot: int = 5,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    *,
    add_special_tokens: bool | None = None,
    max_padding: float = 0.15,
    progress: bool = True,
) -> MMLUResult:
    """Score MMLU like lm-eval's default ``mmlu`` task, with one prefix KV cache per subject.

    Works with any HF causal LM whose forward accepts ``past_key_values``/``position_ids``
    (plain or peft-wrapped). ``add_special_tokens`` mirrors lm-eval's ``add_bos_token`` model
    arg (``None``: the tokenizer's default). ``max_padding`` bounds padded/real tokens per batch
    (rows are batched longest-first). Contexts are not left-truncated: they must fit
    the model's context window (5-shot MMLU does, for 2k+ windows).
    """
    device = torch.device(device) if device is not None else _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    conts = [TARGET_DELIMITER + letter for letter in LETTERS]

    plans = []
    for name, subject in subjects_data.items():
        if not subject.test:
            raise ValueError(f"subject {name!r} has no test questions")
        prefix_text = fewshot_prefix(subject, num_fewshot)
        contexts = [prefix_text + format_question(q) for q in subject.test]
        encoded = encode_pairs(tokenizer, contexts, [conts] * len(contexts), add_special_tokens)
        plans.append((name, subject, _plan_rows(encoded)))

    was_training = getattr(model, "training", False)
    model.eval()
    per_subject: dict[str, Score] = {}
    predictions: list[MMLUPrediction] = []
    start = time.perf_counter()
    bar = tqdm(
        total=sum(len(rows) for _, _, (_, rows, _) in plans),
        desc="MMLU",
        disable=not progress,
    )
    try:
        with torch.inference_mode(), _native_gqa_sdpa(device):
            for name, subject, (prefix, rows, _) in plans:
                bar.set_postfix_str(name)
                scorer = _PrefixScorer(model, prefix, device, pad_id)
                ll = [[0.0] * 4 for _ in subject.test]
                mine: dict[tuple[int, int], float] = {}
                for bi, batch in enumerate(_length_batches(rows, batch_size, max_padding)):
                    if not distributed.mine(bi):
                        bar.update(len(batch))
                        continue  # another rank scores this batch
                    logp = scorer.logprobs(batch)
                    keep = logp.shape[1]
                    # one gather (and one device->host copy) for every target token of the batch
                    idx = [
                        (b, keep - len(cont) + j, tok)
                        for b, row in enumerate(batch)
                        for _, _, cont in row.targets
                        for j, tok in enumerate(cont)
                    ]
                    rows_i, pos_i, tok_i = torch.tensor(idx, device=logp.device).unbind(1)
                    values = logp[rows_i, pos_i, tok_i].tolist()
                    k = 0
                    for row in batch:
                        for qi, ci, cont in row.targets:
                            mine[(qi, ci)] = sum(values[k : k + len(cont)])
                            k += len(cont)
                    bar.update(len(batch))
                for (qi, ci), v in distributed.merge_gathered(mine).items():
                    ll[qi][ci] = v
                correct = []
                for qi, q in enumerate(subject.test):
                    pred = max(range(4), key=lambda c: (ll[qi][c], -c))  # first max, like argmax
                    predictions.append(MMLUPrediction(name, qi, tuple(ll[qi]), pred, q.answer))
                    correct.append(float(pred == q.answer))
                per_subject[name] = Score(sum(correct) / len(correct), mean_stderr(correct), len(correct))
    finally:
        bar.close()
        model.train(was_training)

    sizes = [s.n for s in per_subject.values()]
    aggregate = Score(
        weighted_mean([s.accuracy for s in per_subject.values()], sizes),
        pooled_stderr([s.stderr for s in per_subject.values()], sizes),
        sum(sizes),
    )
    return MMLUResult(per_subject, aggregate, predictions, num_fewshot, time.perf_counter() - start)


__all__ = [
    "LETTERS",
    "MMLUPrediction",
    "MMLUQuestion",
    "MMLUResult",
    "MMLUSubject",
    "Score",
    "build_prompt",
    "encode_pairs",
    "evaluate_mmlu",
    "fewshot_prefix",
    "format_question",
    "load_mmlu",
    "subject_description",
]
