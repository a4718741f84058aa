"""MMLU as an lm-evaluation-harness task: data, few-shot contexts, accuracy. Scoring is generic.

Parity target: lm-eval 0.4.13's ``mmlu`` task, default variant (``tasks/mmlu/default``), whose
prompt is this module's default format (the ``mmlu:`` section of a task YAML, see ``tasks.py``;
every field can be changed there, e.g. to lm-eval's ``mmlu_continuation`` / SmolLM2's cloze):

* context = ``description`` (``"The following are multiple choice questions (with answers) about
  {subject}.\\n\\n"``) + each of the first ``k`` dev rows (lm-eval ``first_n`` sampler; a dev row
  equal to the test row is dropped, as lm-eval does) as ``doc_to_text + target_delimiter + answer +
  fewshot_delimiter``, + the test row's ``doc_to_text``, by default
  ``"{question.strip()}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:"`` (choices not stripped);
* continuations ``target_delimiter + label`` (``" A"`` .. ``" D"``), or ``+ answer text`` with
  ``choices: texts``; the prediction is the first argmax of the summed log-likelihoods, divided by
  the choice's characters / UTF-8 bytes / tokens with ``normalize: chars|bytes|tokens`` (lm-eval's
  ``acc_norm`` / ``acc_bytes``); metric accuracy, lm-eval's stderr, size-weighted aggregate.

Log-likelihoods come from :func:`align.evaluation.multiple_choice.score_choices` (lm-eval's
tokenization, one prefix KV cache per subject's few-shot block, batches sharded over processes).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from align.errors import did_you_mean
from align.evaluation.metrics import mean_stderr, pooled_stderr, weighted_mean

# re-exported: the engine's pieces were defined here before `multiple_choice.py` (tests use them)
from align.evaluation.multiple_choice import (  # noqa: F401
    ChoiceRequest,
    ChoiceScores,
    _length_batches,
    _plan_rows,
    _Row,
    argmax,
    encode_pairs,
    length_normalized,
    score_choices,
)
from align.evaluation.tasks import MultipleChoicePrompt, render_template

LETTERS: tuple[str, str, str, str] = ("A", "B", "C", "D")  # answer letters of the CSV release
DEFAULT_FORMAT = MultipleChoicePrompt()  # lm-eval's `mmlu` (default) prompt


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
        """The default (lm-eval ``mmlu``) prompt's first line for this subject."""
        return subject_description(self.name)


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
                have = sorted(by_split["test"])
                raise ValueError(
                    f"subject {name!r} has no rows in {source['test']}{did_you_mean(name, have)}; "
                    f"available: {', '.join(have)}"
                )
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
            have = sorted(
                {p.name.rsplit("_test.", 1)[0] for ext in exts for p in (root / "test").glob(f"*_test.{ext}")}
            )
            raise FileNotFoundError(
                f"MMLU subject {name!r}: no test file {root / 'test' / name}_test.{pattern}"
                f"{did_you_mean(name, have)}; available: {', '.join(have) or 'none'}"
            )
        dev_file = _find_split_file(root, "dev", name, exts)
        if dev_file is None and require_dev:
            raise FileNotFoundError(f"MMLU dev file not found: {root / 'dev' / name}_dev.{pattern}")
        dev = _read_split_file(dev_file) if dev_file else []
        out[name] = MMLUSubject(name, _read_split_file(test_file)[:limit], dev)
    return out


# --------------------------------------------------------------------------- prompts


class MMLUPrompter:
    """A :class:`~align.evaluation.tasks.MultipleChoicePrompt` applied to MMLU rows (lm-eval's
    ``fewshot_context`` / ``construct_requests`` for a ``multiple_choice`` task)."""

    def __init__(self, fmt: MultipleChoicePrompt | None = None) -> None:
        self.fmt = fmt if fmt is not None else DEFAULT_FORMAT

    def _doc(self, q: MMLUQuestion, subject: str) -> dict[str, Any]:
        """The record the templates see: a cais/mmlu row, plus the choice labels."""
        return {
            "question": q.question,
            "choices": list(q.choices),
            "answer": q.answer,
            "subject": subject,
            "labels": list(self.fmt.choice_labels),
        }

    def description(self, subject: str) -> str:
        return render_template(self.fmt.description, subject=subject, labels=list(self.fmt.choice_labels))

    def text(self, q: MMLUQuestion, subject: str = "") -> str:
        """``doc_to_text``: the question as it is asked (no answer)."""
        return render_template(self.fmt.doc_to_text, **self._doc(q, subject))

    def choices(self, q: MMLUQuestion) -> list[str]:
        """``doc_to_choice``: the labels (``letters``) or the answer texts (``texts``)."""
        if self.fmt.choices == "texts":
            return list(q.choices)
        labels = self.fmt.choice_labels
        if len(labels) != len(q.choices):
            raise ValueError(f"choice_labels has {len(labels)} labels but the question has {len(q.choices)} choices")
        return list(labels)

    def continuations(self, q: MMLUQuestion) -> list[str]:
        return [self.fmt.target_delimiter + c for c in self.choices(q)]

    def shot(self, q: MMLUQuestion, subject: str = "") -> str:
        """A solved example: ``doc_to_text + target_delimiter + answer`` (no few-shot delimiter)."""
        return self.text(q, subject) + self.fmt.target_delimiter + self.choices(q)[q.answer]

    def shots(self, subject: MMLUSubject, num_fewshot: int) -> list[MMLUQuestion]:
        """lm-eval's ``first_n`` draw: the first ``num_fewshot`` dev rows."""
        if num_fewshot > len(subject.dev):
            raise ValueError(f"{subject.name}: num_fewshot={num_fewshot} but only {len(subject.dev)} dev rows")
        return subject.dev[:num_fewshot]

    def contexts(self, subject: MMLUSubject, num_fewshot: int) -> list[tuple[str, str]]:
        """``(few-shot prefix, full context)`` of each test row, in order. As lm-eval's
        ``get_context``, a drawn shot equal to the test row itself is dropped (not replaced)."""
        shots = self.shots(subject, num_fewshot)
        blocks = [self.shot(d, subject.name) + self.fmt.fewshot_delimiter for d in shots]
        head = self.description(subject.name)
        shared = head + "".join(blocks)
        out = []
        for q in subject.test:
            prefix = shared
            if q in shots:
                prefix = head + "".join(b for d, b in zip(shots, blocks, strict=True) if d != q)
            out.append((prefix, prefix + self.text(q, subject.name)))
        return out

    def lengths(self, q: MMLUQuestion, scores: ChoiceScores) -> Sequence[float] | None:
        """What ``normalize`` divides by (``None``: raw sums). chars / bytes are those of the
        choice strings without the delimiter, as lm-eval's ``acc_norm`` / ``acc_bytes``."""
        how = self.fmt.normalize
        if how == "none":
            return None
        if how == "tokens":
            return scores.num_tokens
        return [len(c) if how == "chars" else len(c.encode("utf-8")) for c in self.choices(q)]


def subject_description(subject: str, fmt: MultipleChoicePrompt | None = None) -> str:
    """The prompt's first line for ``subject`` (lm-eval's per-subject ``description``)."""
    return MMLUPrompter(fmt).description(subject)


def format_question(
    q: MMLUQuestion,
    with_answer: bool = False,
    *,
    fmt: MultipleChoicePrompt | None = None,
    subject: str = "",
) -> str:
    """lm-eval ``doc_to_text`` (default: question stripped, choices verbatim), plus the target
    delimiter and the answer (`` X``) if ``with_answer``."""
    p = MMLUPrompter(fmt)
    return p.shot(q, subject) if with_answer else p.text(q, subject)


def fewshot_prefix(subject: MMLUSubject, num_fewshot: int, *, fmt: MultipleChoicePrompt | None = None) -> str:
    """Description plus the first ``num_fewshot`` dev rows: the part shared by all questions."""
    p = MMLUPrompter(fmt)
    return p.description(subject.name) + "".join(
        p.shot(q, subject.name) + p.fmt.fewshot_delimiter for q in p.shots(subject, num_fewshot)
    )


def build_prompt(
    subject: MMLUSubject,
    question: MMLUQuestion,
    num_fewshot: int = 5,
    *,
    fmt: MultipleChoicePrompt | None = None,
) -> str:
    """Full context string for one test question (by default it ends with ``"Answer:"``)."""
    one = MMLUSubject(subject.name, [question], subject.dev)
    return MMLUPrompter(fmt).contexts(one, num_fewshot)[0][1]


# --------------------------------------------------------------------------- evaluation


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
    loglikelihoods: tuple[float, ...]
    prediction: int
    answer: int
    num_tokens: tuple[int, ...] = ()

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
    normalize: str = "none"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for p in d["predictions"]:
            p["correct"] = p["prediction"] == p["answer"]
        return d


def mmlu_requests(
    subjects_data: Mapping[str, MMLUSubject],
    num_fewshot: int = 5,
    fmt: MultipleChoicePrompt | None = None,
) -> list[ChoiceRequest]:
    """One :class:`ChoiceRequest` per test question, subjects in order; questions that share a
    few-shot prefix share a cache group."""
    p = MMLUPrompter(fmt)
    out = []
    for name, subject in subjects_data.items():
        if not subject.test:
            raise ValueError(f"subject {name!r} has no test questions")
        for q, (prefix, context) in zip(subject.test, p.contexts(subject, num_fewshot), strict=True):
            out.append(ChoiceRequest(context, tuple(p.continuations(q)), group=(name, prefix)))
    return out


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
    prompt_format: MultipleChoicePrompt | None = None,
) -> MMLUResult:
    """Score MMLU like lm-eval's ``mmlu`` task (or the variant ``prompt_format`` describes).

    ``add_special_tokens`` mirrors lm-eval's ``add_bos_token`` model arg (``None``: the
    tokenizer's default); ``batch_size`` / ``max_padding`` / ``device``: see
    :func:`~align.evaluation.multiple_choice.score_choices`. Contexts are not left-truncated:
    they must fit the model's context window (5-shot MMLU does, for 2k+ windows).
    """
    p = MMLUPrompter(prompt_format)
    requests = mmlu_requests(subjects_data, num_fewshot, p.fmt)
    start = time.perf_counter()
    scores = score_choices(
        model,
        tokenizer,
        requests,
        batch_size=batch_size,
        device=device,
        add_special_tokens=add_special_tokens,
        max_padding=max_padding,
        progress=progress,
        desc="MMLU",
    )
    per_subject: dict[str, Score] = {}
    predictions: list[MMLUPrediction] = []
    it = iter(scores)
    for name, subject in subjects_data.items():
        correct = []
        for qi, q in enumerate(subject.test):
            s = next(it)
            lengths = p.lengths(q, s)
            pred = argmax(s.loglikelihoods if lengths is None else length_normalized(s.loglikelihoods, lengths))
            predictions.append(MMLUPrediction(name, qi, s.loglikelihoods, pred, q.answer, s.num_tokens))
            correct.append(float(pred == q.answer))
        per_subject[name] = Score(sum(correct) / len(correct), mean_stderr(correct), len(correct))

    sizes = [s.n for s in per_subject.values()]
    aggregate = Score(
        weighted_mean([s.accuracy for s in per_subject.values()], sizes),
        pooled_stderr([s.stderr for s in per_subject.values()], sizes),
        sum(sizes),
    )
    seconds = time.perf_counter() - start
    return MMLUResult(per_subject, aggregate, predictions, num_fewshot, seconds, p.fmt.normalize)


__all__ = [
    "DEFAULT_FORMAT",
    "LETTERS",
    "MMLUPrediction",
    "MMLUPrompter",
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
    "mmlu_requests",
    "subject_description",
]
