"""Evaluation task definitions as data (``evaluation/tasks/*.yaml``).

Schema (every level rejects unknown keys, so a typo fails naming the field)::

    name: wmt22_de_en            # required, free text (used in reports)
    version: 1                   # bump when prompt/data/metric change (results not comparable)
    description: "..."           # optional
    language: en                 # generation: language of outputs and references (BCP-47: en, de, zh, ja-JP);
                                 # picks ROUGE's tokenizer and BLEU's default tokenizer (unset = en)
    type: generation             # mmlu | generation | perplexity
    data:
      path: ../shared/data/...   # file or folder: absolute, or relative to the current folder, else to the
                                 # task file's folder, else to a source checkout's root; or a hub dataset id
      format: jsonl              # mmlu_csv | mmlu_jsonl (folder layouts, see mmlu.load_mmlu) | jsonl
      subjects: [...]            # mmlu: subset of subjects (default: all found)
      input_field: source        # generation: record field(s) used by the prompt template
      reference_field: references  # generation: str, list of str, or {name: str} (values used)
      text_field: text           # perplexity: field holding the text
    prompt:                      # generation only
      template: "...{source}..." # str.format over the record; literal braces as {{ }}
      use_chat_template: true    # wrap as one user turn if the tokenizer has a chat template
    mmlu:                        # mmlu only; every key optional, defaults = lm-eval's `mmlu` task
      num_fewshot: 5             # first N dev rows (lm-eval `first_n`; a dev row equal to the question is skipped)
      description: "The following are multiple choice questions (with answers) about {{subject.replace('_', ' ')}}.\n\n"
      doc_to_text: "{{question.strip()}}\nA. {{choices[0]}}\nB. ...\nD. {{choices[3]}}\nAnswer:"  # MMLU_DOC_TO_TEXT
      choices: letters           # letters: continuations are choice_labels | texts: the answer texts (cloze)
      choice_labels: [A, B, C, D]
      target_delimiter: " "      # between context and continuation (and a shot's text and its answer)
      fewshot_delimiter: "\n\n"  # after each shot
      normalize: none            # none (acc) | chars (acc_norm) | bytes (acc_bytes) | tokens (per-token mean)
    generation: {max_new_tokens: 256}   # generation only
    metric:                      # default from type: accuracy / perplexity
      name: bleu                 # accuracy | bleu | chrf | chrf++ | rouge | perplexity
      tokenize: 13a              # bleu: a sacrebleu tokenizer (default 13a; zh for zh, ja-mecab / ko-mecab for ja / ko)
      lowercase: false           # bleu, chrf: case-insensitive
      smooth_method: exp         # bleu: exp | floor | add-k | none (sacrebleu's)
      effective_order: false     # bleu: skip n-gram orders with no match (for sentence-level BLEU)
      # chrf / chrf++ (word bigrams, sacrebleu word_order=2): lowercase, whitespace
      # rouge: rouge_types: [rouge1, rouge2, rougeL, rougeLsum]
      #        tokenizer: rouge_score | unicode | cjk   (default from `language`, see ROUGE_TOKENIZERS)
      #        use_stemmer: true   (Porter, English only; default true with the rouge_score tokenizer)
      #        sentence_split: newline | punctuation   (rougeLsum's sentences; default newline)
    # several metrics: a list, the first is the task's headline `score`
    # metric: [{name: bleu}, {name: chrf}, {name: chrf++}]
    batch_size: 8
    limit: null                  # first N items (per subject for mmlu), null = all

The ``mmlu`` prompt fields use lm-eval's names and its Jinja2 syntax (``StrictUndefined``, trailing
newlines kept), so a ``doc_to_text`` can be copied from an lm-eval task YAML. ``doc_to_text`` sees a
cais/mmlu record, ``question``, ``choices`` (list), ``answer`` (index), ``subject`` (e.g.
``abstract_algebra``), plus ``labels`` (= ``choice_labels``); ``description`` sees ``subject`` and
``labels`` (``mmlu.description`` is the prompt's header, lm-eval's ``description``; the top-level
``description`` is free text for reports). The context of a question is ``description`` + each shot's ``doc_to_text +
target_delimiter + answer + fewshot_delimiter`` + the question's ``doc_to_text``; each choice is
scored as ``target_delimiter + (label or text)``.
"""

from __future__ import annotations

import functools
import json
import re
import string
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from align.yamlio import load_yaml_text

TASKS_DIR = Path("evaluation") / "tasks"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Strict):
    """Where the items live and which fields matter."""

    path: str  # a local file or folder, or a hub dataset id (`cais/mmlu`), fetched once and cached
    format: Literal["mmlu_csv", "mmlu_jsonl", "jsonl"]
    config: str | None = None  # hub data: the dataset's config (MMLU: `all`, or one subject)
    split: str = "test"  # hub data: the split scored (MMLU's few-shot rows come from `dev`)
    revision: str | None = None  # hub data: a commit, tag or branch
    subjects: list[str] | None = None
    input_field: str | None = None
    reference_field: str | None = None
    text_field: str | None = None


class PromptSpec(_Strict):
    """How a record becomes the model's prompt."""

    template: str
    use_chat_template: bool = True

    @model_validator(mode="after")
    def _check_template(self) -> PromptSpec:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        except ValueError as e:
            raise ValueError(f"prompt.template is not a valid format string: {e}") from e
        if not fields or any(not f.isidentifier() for f in fields):
            raise ValueError(
                "prompt.template must name record fields as {field} (literal braces as {{ }}), "
                f"got fields {fields}"
            )
        return self


def _regex_replace(value: str, pattern: str, repl: str, count: int = 0) -> str:
    """lm-eval's ``regex_replace`` Jinja filter."""
    return re.sub(pattern, repl, value, count=count)


@functools.cache
def _jinja_env() -> Any:
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # as lm-eval's `utils.apply_template` environment (sandboxed: task files may come from anywhere)
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = _regex_replace
    return env


@functools.lru_cache(maxsize=256)
def compile_template(source: str) -> Any:
    """A Jinja2 template of a task file, compiled once."""
    return _jinja_env().from_string(source)


def render_template(source: str, **variables: Any) -> str:
    return compile_template(source).render(**variables)


def _check_template(source: str, allowed: set[str]) -> str:
    from jinja2 import TemplateSyntaxError, meta

    env = _jinja_env()
    try:
        names = meta.find_undeclared_variables(env.parse(source))
    except TemplateSyntaxError as e:
        raise ValueError(f"not a valid Jinja2 template: {e}") from e
    unknown = sorted(names - allowed - set(env.globals))
    if unknown:
        raise ValueError(f"template uses unknown variable(s) {unknown}; available: {sorted(allowed)}")
    return source


MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {{subject.replace('_', ' ')}}.\n\n"
MMLU_DOC_TO_TEXT = (
    "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
)
DOC_VARIABLES = {"question", "choices", "answer", "subject", "labels"}
DESCRIPTION_VARIABLES = {"subject", "labels"}


class MultipleChoicePrompt(_Strict):
    """Prompt format of a multiple-choice task (lm-eval's field names; defaults: lm-eval's ``mmlu``)."""

    description: str = MMLU_DESCRIPTION
    doc_to_text: str = MMLU_DOC_TO_TEXT
    choices: Literal["letters", "texts"] = "letters"
    choice_labels: list[str] = Field(default_factory=lambda: ["A", "B", "C", "D"], min_length=1)
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    normalize: Literal["none", "chars", "bytes", "tokens"] = "none"

    @field_validator("description")
    @classmethod
    def _check_description(cls, v: str) -> str:
        return _check_template(v, DESCRIPTION_VARIABLES)

    @field_validator("doc_to_text")
    @classmethod
    def _check_doc_to_text(cls, v: str) -> str:
        return _check_template(v, DOC_VARIABLES)

    @field_validator("choice_labels")
    @classmethod
    def _check_labels(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"choice_labels must be distinct, got {v}")
        return v


class MMLUSpec(MultipleChoicePrompt):
    num_fewshot: int = Field(5, ge=0)


class GenerationSpec(_Strict):
    max_new_tokens: int = Field(256, gt=0)


class AccuracyMetric(_Strict):
    name: Literal["accuracy"]


class PerplexityMetric(_Strict):
    name: Literal["perplexity"]


def _sacrebleu_choices(what: str) -> list[str] | None:
    """sacrebleu's own lists (tokenizers, smoothing methods); None when the `eval` extra is absent
    (the value is then checked when scoring)."""
    try:
        from sacrebleu.metrics.bleu import BLEU
    except ImportError:
        return None
    return list(BLEU.TOKENIZERS) if what == "tokenize" else list(BLEU.SMOOTH_DEFAULTS)


def _one_of(field: str, value: str, choices: list[str] | None) -> str:
    if choices is not None and value not in choices:
        from align.errors import did_you_mean

        raise ValueError(
            f"{field} {value!r} is not one of sacrebleu's: {', '.join(choices)}{did_you_mean(value, choices)}"
        )
    return value


# sacrebleu's own choice when it knows the target language (`BLEU(trg_lang=...)`); 13a otherwise
BLEU_TOKENIZE_BY_LANGUAGE = {"zh": "zh", "ja": "ja-mecab", "ko": "ko-mecab"}


class BleuMetric(_Strict):
    """Corpus BLEU via sacrebleu; every option is sacrebleu's, with its defaults."""

    name: Literal["bleu"]
    tokenize: str | None = Field(None, description="sacrebleu tokenizer; default from the task's language, else 13a")
    lowercase: bool = False
    smooth_method: str = "exp"
    effective_order: bool = False

    @field_validator("tokenize")
    @classmethod
    def _check_tokenize(cls, v: str | None) -> str | None:
        return None if v is None else _one_of("tokenize", v, _sacrebleu_choices("tokenize"))

    @field_validator("smooth_method")
    @classmethod
    def _check_smooth(cls, v: str) -> str:
        return _one_of("smooth_method", v, _sacrebleu_choices("smooth_method"))


class ChrfMetric(_Strict):
    """chrF (character 6-grams) or chrF++ (plus word bigrams) via sacrebleu, beta 2."""

    name: Literal["chrf", "chrf++"]
    lowercase: bool = False
    whitespace: bool = Field(False, description="count whitespace inside character n-grams")

    @property
    def word_order(self) -> int:
        return 2 if self.name == "chrf++" else 0


# ROUGE tokenizers: rouge_score = rouge-score's own (lowercase, ASCII letters and digits only, optional
# Porter stemming: English); unicode = NFKC, lowercase, runs of letters/digits/marks of any script
# (Latin with diacritics, Cyrillic, Greek, ...); cjk = unicode, with each Han/kana/Hangul character a token.
ROUGE_TOKENIZERS = ("rouge_score", "unicode", "cjk")
CJK_LANGUAGES = {"zh", "ja", "ko", "cmn", "yue", "wuu", "lzh"}


def rouge_tokenizer_for(language: str | None) -> str:
    """The default ROUGE tokenizer of a task language (BCP-47; None = English)."""
    primary = (language or "en").split("-")[0].lower()
    if primary == "en":
        return "rouge_score"
    return "cjk" if primary in CJK_LANGUAGES else "unicode"


class RougeMetric(_Strict):
    name: Literal["rouge"]
    rouge_types: list[Literal["rouge1", "rouge2", "rougeL", "rougeLsum"]] = Field(
        default_factory=lambda: ["rouge1", "rouge2", "rougeL", "rougeLsum"], min_length=1
    )
    tokenizer: Literal["rouge_score", "unicode", "cjk"] | None = Field(
        None, description="default from the task's language: rouge_score (en), cjk (zh/ja/ko), else unicode"
    )
    use_stemmer: bool | None = Field(None, description="Porter stemming (English); default: on with rouge_score")
    sentence_split: Literal["newline", "punctuation"] = Field(
        "newline", description="rougeLsum's sentences: one per line, or split after . ! ? and their CJK forms"
    )

    @model_validator(mode="after")
    def _check_stemmer(self) -> RougeMetric:
        if self.use_stemmer and self.tokenizer not in (None, "rouge_score"):
            raise ValueError(
                f"use_stemmer: the Porter stemmer is English-only; it works with tokenizer rouge_score, "
                f"not {self.tokenizer}"
            )
        return self


_METRIC_TYPES = AccuracyMetric | PerplexityMetric | BleuMetric | ChrfMetric | RougeMetric
Metric = Annotated[_METRIC_TYPES, Field(discriminator="name")]
# `metric:` is one mapping or a list of them (the first is the headline); tagged so that an error names
# only the branch the YAML used
MetricField = Annotated[
    Annotated[Metric, Tag("one")] | Annotated[list[Metric], Tag("list")],
    Discriminator(lambda v: "list" if isinstance(v, list) else "one"),
]

_ALLOWED = {
    "mmlu": ({"mmlu_csv", "mmlu_jsonl"}, {"accuracy"}),
    "generation": ({"jsonl"}, {"bleu", "chrf", "chrf++", "rouge"}),
    "perplexity": ({"jsonl"}, {"perplexity"}),
}
_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")


class TaskSpec(_Strict):
    """One evaluation task; see the module docstring for the YAML layout."""

    name: str
    version: int = 1
    description: str = ""
    language: str | None = None
    type: Literal["mmlu", "generation", "perplexity"]
    data: DataSpec
    prompt: PromptSpec | None = None
    mmlu: MMLUSpec | None = None
    generation: GenerationSpec | None = None
    metric: MetricField | None = None
    batch_size: int = Field(8, gt=0)
    limit: int | None = Field(None, gt=0)

    @field_validator("language")
    @classmethod
    def _check_language(cls, v: str | None) -> str | None:
        if v is not None and not _LANGUAGE.match(v):
            raise ValueError(f"language {v!r} is not a BCP-47 code such as en, de, zh, pt-BR, zh-Hant")
        return v

    @model_validator(mode="after")
    def _check_type(self) -> TaskSpec:
        formats, allowed = _ALLOWED[self.type]
        if self.data.format not in formats:
            raise ValueError(f"type {self.type}: data.format must be one of {sorted(formats)}")
        if self.metric is None:
            if self.type == "generation":
                raise ValueError("type generation: metric is required (bleu, chrf, chrf++ or rouge)")
            default = AccuracyMetric(name="accuracy") if self.type == "mmlu" else PerplexityMetric(name="perplexity")
            self.metric = default
        names = [m.name for m in self.metrics]
        if not names:
            raise ValueError("metric: the list is empty; name at least one metric")
        if any(n not in allowed for n in names):
            raise ValueError(f"type {self.type}: metric.name must be one of {sorted(allowed)}, got {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"metric: each metric may be listed once, got {names}")
        if len(names) > 1 and self.type != "generation":
            raise ValueError(f"metric: a list of metrics is only valid for type generation, not {self.type}")
        for m in self.metrics:
            self._resolve_defaults(m)
        for section in ("mmlu", "generation"):
            if section != self.type and getattr(self, section) is not None:
                raise ValueError(f"section {section!r} is only valid for type {section}")
        if self.type == "mmlu":
            self.mmlu = self.mmlu or MMLUSpec()
        if self.type == "generation":
            self.generation = self.generation or GenerationSpec()
            missing = [f for f in ("input_field", "reference_field") if not getattr(self.data, f)]
            if missing or self.prompt is None:
                need = [f"data.{f}" for f in missing] + (["prompt"] if self.prompt is None else [])
                raise ValueError(f"type generation requires {', '.join(need)}")
        elif self.prompt is not None:
            raise ValueError(f"section 'prompt' is only valid for type generation, not {self.type}")
        if self.type == "perplexity" and not self.data.text_field:
            raise ValueError("type perplexity requires data.text_field")
        return self

    def _resolve_defaults(self, m: Any) -> None:
        """Language-dependent defaults written into the spec, so a task's settings are explicit once loaded."""
        primary = (self.language or "en").split("-")[0].lower()
        if isinstance(m, BleuMetric) and m.tokenize is None:
            m.tokenize = BLEU_TOKENIZE_BY_LANGUAGE.get(primary, "13a")
        if isinstance(m, RougeMetric):
            if m.tokenizer is None:
                m.tokenizer = rouge_tokenizer_for(self.language)
                if m.use_stemmer and m.tokenizer != "rouge_score":
                    raise ValueError(
                        f"metric rouge: use_stemmer is English-only, and language {self.language!r} "
                        f"uses tokenizer {m.tokenizer}; drop use_stemmer"
                    )
            if m.use_stemmer is None:
                m.use_stemmer = m.tokenizer == "rouge_score"

    @property
    def metrics(self) -> list[Any]:
        """Every metric of the task, the headline (``score``) first."""
        if self.metric is None:
            return []
        return list(self.metric) if isinstance(self.metric, list) else [self.metric]

    def resolve_path(self, root: str | Path | None = None) -> Path:
        """``data.path`` made absolute against the project root (default: current directory)."""
        p = Path(self.data.path).expanduser()
        return p if p.is_absolute() else Path(root or Path.cwd()) / p

    @property
    def from_hub(self) -> bool:
        from align.evaluation.hubdata import is_hub_id

        return is_hub_id(self.data.path) and not self.resolve_path(_data_root(self.data.path)).exists()

    def data_source(self, root: str | Path | None = None) -> Any:
        """What the loaders read: the local path, or for hub data the cached JSONL file(s) (fetched once)."""
        if not self.from_hub:
            return self.resolve_path(root)
        from align.evaluation import hubdata

        where = f"task {self.name}: data.path {self.data.path}"
        if self.type == "mmlu":
            return hubdata.mmlu_files(self.data.path, self.data.config, self.data.revision, where=where)
        return hubdata.fetch(self.data.path, self.data.config, self.data.split, self.data.revision, where=where)


def _data_root(relative: str) -> Path:
    from align.resources import data_root

    return data_root(relative)


def _why(err: Any) -> str:
    """A validation error's message; an unknown key gets a did-you-mean over the keys valid where it stands,
    or where it belongs when it is valid elsewhere in a task file."""
    loc = [x for x in err.get("loc", ()) if x not in ("one", "list") and not isinstance(x, int)]
    if err.get("type") != "extra_forbidden" or not loc:
        return err["msg"]
    from align.errors import did_you_mean

    key, models = str(loc[-1]), [TaskSpec]
    for part in loc[:-1]:
        inner = [m for c in models if part in c.model_fields for m in _models_in(c.model_fields[part].annotation)]
        tagged = [c for c in models if part in typing.get_args(getattr(c.model_fields.get("name"), "annotation", None))]
        models = inner or tagged or models
    here = {f.alias or n for m in models for n, f in m.model_fields.items()}
    hint = "" if key in here else did_you_mean(key, here)
    if not hint and key not in here:
        homes = sorted(".".join(path) for path in _key_paths(TaskSpec, ()) if path[-1] == key and len(path) > 1)
        hint = f" (it goes under `{homes[0].rsplit('.', 1)[0]}:`)" if homes else ""
    return f"unknown key{hint}"


def _models_in(annotation: Any) -> list[Any]:
    """The pydantic models an annotation names (through unions, lists and Annotated)."""
    out, stack = [], [annotation]
    while stack:
        t = stack.pop()
        if isinstance(t, type) and issubclass(t, BaseModel):
            out.append(t)
        stack += list(typing.get_args(t))
    return out


def _key_paths(model: Any, prefix: tuple[str, ...], depth: int = 0) -> list[tuple[str, ...]]:
    """Every key path of a task spec (nested models followed a few levels deep)."""
    paths = []
    for name, field in model.model_fields.items():
        path = (*prefix, field.alias or name)
        paths.append(path)
        if depth < 3:
            for m in _models_in(field.annotation):
                paths += _key_paths(m, path, depth + 1)
    return paths


class TaskSpecError(ValueError):
    """A task YAML that does not match the schema; the message names file and fields."""


def _candidate_dirs(tasks_dir: str | Path | None) -> list[Path]:
    if tasks_dir is not None:
        return [Path(tasks_dir)]
    from align.resources import task_dir

    dirs = [Path.cwd() / TASKS_DIR]  # a user's own tasks first, then the ones shipped in the package
    shipped = task_dir()
    return dirs + ([shipped] if shipped.resolve() not in [d.resolve() for d in dirs if d.exists()] else [])


def load_task(path_or_name: str | Path, tasks_dir: str | Path | None = None) -> TaskSpec:
    """Load a task from a YAML path, or by name from ``evaluation/tasks/<name>.yaml``.

    Errors are FileNotFoundError (no such task: the known ones listed) or TaskSpecError (a ValueError) whose
    first line names the file and what is wrong: YAML syntax (with its line), a top level that is not a
    mapping, a schema error, or (when the data is there to look at) MMLU subjects or rows the data lacks."""
    candidate = Path(path_or_name)
    if candidate.suffix in {".yaml", ".yml"} or candidate.is_file():
        path = candidate
        if not path.is_file():
            what = "a folder, not a file" if path.is_dir() else "not found"
            raise FileNotFoundError(f"task file {what}: {path}")
    else:
        dirs = _candidate_dirs(tasks_dir)
        found = [d / f"{path_or_name}{ext}" for d in dirs for ext in (".yaml", ".yml")]
        found = [p for p in found if p.is_file()]
        if not found:
            from align.errors import did_you_mean

            known = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.y*ml")})
            raise FileNotFoundError(
                f"no task named {path_or_name!r}{did_you_mean(str(path_or_name), known)}; known: {known} "
                f"(in {[str(d) for d in dirs]}), or give a task YAML path"
            )
        path = found[0]
    raw = _read_task_yaml(path)
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise TaskSpecError(
            f"{path}: a task file must be a mapping (name:, type:, data:, ...) at the top level, got {got}"
        )
    try:
        spec = TaskSpec.model_validate(raw)
    except ValidationError as e:
        # every error on one line, by field (the metric union's internal tags `one`/`list` left out of the path)
        parts = [
            f"{'.'.join(str(x) for x in err.get('loc', ()) if x not in ('one', 'list')) or 'task'}: {_why(err)}"
            for err in e.errors()
        ]
        raise TaskSpecError(f"{path}: invalid task spec ({'; '.join(parts) or 'invalid'})") from e
    _data_beside_task_file(spec, path)
    check_task_data(spec, path)
    return spec


def _data_beside_task_file(spec: TaskSpec, path: Path) -> None:
    """A relative ``data.path`` found from the current folder reads as before; one found only beside the task
    file (a task file written with its data, run from anywhere) is made absolute there. Otherwise the path stays
    as written (a source checkout's root, a hub id, or the not-found message)."""
    rel = Path(spec.data.path).expanduser()
    if rel.is_absolute() or rel.exists():
        return
    beside = path.parent / rel
    if beside.exists():
        spec.data.path = str(beside.resolve())


def _read_task_yaml(path: Path) -> Any:
    import yaml

    from align.yamlio import read_text_file

    try:
        text = read_text_file(path)
    except OSError as e:
        raise TaskSpecError(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:  # binary, or not UTF-8 (names the byte and line)
        raise TaskSpecError(f"{path}: {e}") from None
    try:
        return load_yaml_text(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = e.problem or e.context or "invalid YAML"
        raise TaskSpecError(f"{path}: YAML syntax error{at}: {what}; fix the task file") from None
    except yaml.YAMLError as e:  # the duplicate-key refusal, and anything else PyYAML raises
        raise TaskSpecError(f"{path}: {str(e).strip().splitlines()[-1]}") from None


def mmlu_subjects_found(root: Path, file_format: str) -> list[str]:
    """An MMLU folder's subjects: the names of its ``test/<subject>_test.<ext>`` files, as ``load_mmlu`` finds them."""
    ext = "csv" if file_format == "mmlu_csv" else "jsonl"
    return sorted(p.name.rsplit("_test.", 1)[0] for p in (root / "test").glob(f"*_test.{ext}") if p.is_file())


def check_task_data(spec: TaskSpec, path: Path | str, *, rows: bool = False) -> None:
    """What can be checked of a task's data without a model, when the data is there: an MMLU folder's subjects
    (each `subjects:` entry has its test file, and its dev file and enough dev rows for the few-shot), a
    generation task's file being a file. With `rows`, every record of a generation file too (what
    `load_generation_items` will read: JSON, fields, references). The data path itself is checked by the caller
    (the eval stage's plan check, `align eval`), which knows where it runs. `load_task` runs this without `rows`."""
    from align.resources import data_root

    root = spec.resolve_path(data_root(spec.data.path))
    if not root.exists():
        return
    if spec.type == "mmlu":
        _check_mmlu_data(spec, root, path)
    elif spec.type in ("generation", "perplexity"):
        if not root.is_file():
            raise TaskSpecError(f"{path}: data.path {spec.data.path} is a folder; a {spec.type} task reads one .jsonl")
        if rows and spec.type == "generation":
            try:
                load_generation_items(spec.model_copy(update={"limit": None}), data_root(spec.data.path))
            except (OSError, ValueError) as e:
                raise TaskSpecError(f"{path}: data: {e}") from None


def _check_mmlu_data(spec: TaskSpec, root: Path, path: Path | str) -> None:
    from align.errors import did_you_mean

    ext = "csv" if spec.data.format == "mmlu_csv" else "jsonl"
    if not root.is_dir():
        raise TaskSpecError(
            f"{path}: data.path {spec.data.path} is a file; format {spec.data.format} reads a folder with "
            f"test/<subject>_test.{ext} and dev/<subject>_dev.{ext}"
        )
    found = mmlu_subjects_found(root, spec.data.format)
    if not found:
        raise TaskSpecError(f"{path}: data.path {root} has no test/<subject>_test.{ext} files")
    wanted = spec.data.subjects if spec.data.subjects is not None else found
    if spec.data.subjects is not None and not wanted:
        raise TaskSpecError(f"{path}: data.subjects is empty; list subjects or leave it out for all {len(found)}")
    missing = [s for s in wanted if s not in found]
    if missing:
        hints = "".join(did_you_mean(s, found) for s in missing[:3])
        shown = ", ".join(found[:20]) + (f", ... ({len(found)} in all)" if len(found) > 20 else "")
        raise TaskSpecError(
            f"{path}: data.subjects: {', '.join(repr(s) for s in missing)} not in {root}{hints}; available: {shown}"
        )
    repeated = sorted({s for s in wanted if wanted.count(s) > 1})
    if repeated:
        raise TaskSpecError(f"{path}: data.subjects lists {', '.join(repeated)} more than once")
    k = spec.mmlu.num_fewshot if spec.mmlu is not None else 0
    if k > 0:
        no_dev = [s for s in wanted if not (root / "dev" / f"{s}_dev.{ext}").is_file()]
        if no_dev:
            raise TaskSpecError(
                f"{path}: mmlu.num_fewshot is {k} but {root / 'dev'} has no "
                f"{', '.join(f'{s}_dev.{ext}' for s in no_dev[:5])}; add them or set mmlu.num_fewshot: 0"
            )
        for s in wanted:
            dev = root / "dev" / f"{s}_dev.{ext}"
            n = _count_rows(dev)
            if n < k:
                raise TaskSpecError(
                    f"{path}: mmlu.num_fewshot is {k} but {dev} has only {n} row(s); lower num_fewshot or add rows"
                )


def _count_rows(path: Path) -> int:
    """Non-empty rows of an MMLU split file (CSV records, or JSONL lines), without parsing the questions."""
    import csv

    try:
        with path.open(newline="", encoding="utf-8") as f:
            if path.suffix == ".csv":
                return sum(1 for row in csv.reader(f) if row)
            return sum(1 for line in f if line.strip())
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TaskSpecError(f"{path}: cannot be read as UTF-8 {path.suffix[1:]} ({e})") from None


def _references(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    got = "null" if value is None else "an empty list" if value == [] else f"{value!r:.80}"
    raise ValueError(f"{where}: reference must be a string, list or dict of strings, got {got}")


def load_generation_items(spec: TaskSpec, root: str | Path | None = None) -> tuple[list[str], list[list[str]]]:
    """Prompts (template applied; chat template is applied later by ``generate``) and the
    reference list of each item, first ``spec.limit`` records of the JSONL file."""
    if spec.type != "generation" or spec.prompt is None:
        raise ValueError(f"task {spec.name!r} is not a generation task")
    path = spec.data_source(root)
    if not path.is_file():
        where = (
            f" (data.path {spec.data.path} is looked up from the current folder, then beside the task file)"
            if not Path(spec.data.path).expanduser().is_absolute()
            else ""
        )
        raise FileNotFoundError(f"task {spec.name!r}: data file not found: {path}{where}")
    prompts, refs = [], []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if spec.limit is not None and len(prompts) >= spec.limit:
                break
            where = f"{path}:{line_no}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            for field in (spec.data.input_field, spec.data.reference_field):
                if field not in rec:
                    raise ValueError(f"{where}: missing field {field!r} (have {sorted(rec)})")
            if not isinstance(rec[spec.data.input_field], str) or not rec[spec.data.input_field].strip():
                got = rec[spec.data.input_field]
                raise ValueError(
                    f"{where}: field {spec.data.input_field!r} must be a non-empty string, got "
                    f"{'null' if got is None else repr(got)[:60]}"
                )
            try:
                prompts.append(spec.prompt.template.format(**rec))
            except KeyError as e:
                raise ValueError(f"{where}: prompt.template uses field {e} missing in record") from e
            refs.append(_references(rec[spec.data.reference_field], where))
    if not prompts:
        raise ValueError(f"{path}: no records (the file is empty); one JSON object per line")
    return prompts, refs


__all__ = [
    "ROUGE_TOKENIZERS",
    "BleuMetric",
    "ChrfMetric",
    "DataSpec",
    "GenerationSpec",
    "MMLUSpec",
    "MultipleChoicePrompt",
    "PromptSpec",
    "RougeMetric",
    "TaskSpec",
    "TaskSpecError",
    "check_task_data",
    "compile_template",
    "load_generation_items",
    "load_task",
    "mmlu_subjects_found",
    "render_template",
    "rouge_tokenizer_for",
]
