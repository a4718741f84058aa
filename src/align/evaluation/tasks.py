"""Evaluation task definitions as data (``evaluation/tasks/*.yaml``).

Schema (every level rejects unknown keys, so a typo fails naming the field)::

    name: wmt22_de_en            # required, free text (used in reports)
    version: 1                   # bump when prompt/data/metric change (results not comparable)
    description: "..."           # optional
    type: generation             # mmlu | generation | perplexity
    data:
      path: ../shared/data/...   # file or folder, relative to the project root (or absolute)
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
      name: bleu                 # accuracy | bleu | rouge | perplexity
      tokenize: 13a              # bleu: sacrebleu tokenizer
      # rouge: rouge_types: [rouge1, rouge2, rougeL, rougeLsum], use_stemmer: true
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
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from align.yamlio import load_yaml_text

TASKS_DIR = Path("evaluation") / "tasks"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Strict):
    """Where the items live and which fields matter."""

    path: str
    format: Literal["mmlu_csv", "mmlu_jsonl", "jsonl"]
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


class BleuMetric(_Strict):
    name: Literal["bleu"]
    tokenize: str = "13a"


class RougeMetric(_Strict):
    name: Literal["rouge"]
    rouge_types: list[Literal["rouge1", "rouge2", "rougeL", "rougeLsum"]] = Field(
        default_factory=lambda: ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    )
    use_stemmer: bool = True


Metric = Annotated[AccuracyMetric | PerplexityMetric | BleuMetric | RougeMetric, Field(discriminator="name")]

_ALLOWED = {
    "mmlu": ({"mmlu_csv", "mmlu_jsonl"}, {"accuracy"}),
    "generation": ({"jsonl"}, {"bleu", "rouge"}),
    "perplexity": ({"jsonl"}, {"perplexity"}),
}


class TaskSpec(_Strict):
    """One evaluation task; see the module docstring for the YAML layout."""

    name: str
    version: int = 1
    description: str = ""
    type: Literal["mmlu", "generation", "perplexity"]
    data: DataSpec
    prompt: PromptSpec | None = None
    mmlu: MMLUSpec | None = None
    generation: GenerationSpec | None = None
    metric: Metric | None = None
    batch_size: int = Field(8, gt=0)
    limit: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check_type(self) -> TaskSpec:
        formats, metrics = _ALLOWED[self.type]
        if self.data.format not in formats:
            raise ValueError(f"type {self.type}: data.format must be one of {sorted(formats)}")
        if self.metric is None:
            if self.type == "generation":
                raise ValueError("type generation: metric is required (bleu or rouge)")
            default = AccuracyMetric(name="accuracy") if self.type == "mmlu" else PerplexityMetric(name="perplexity")
            self.metric = default
        if self.metric.name not in metrics:
            raise ValueError(f"type {self.type}: metric.name must be one of {sorted(metrics)}")
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

    def resolve_path(self, root: str | Path | None = None) -> Path:
        """``data.path`` made absolute against the project root (default: current directory)."""
        p = Path(self.data.path).expanduser()
        return p if p.is_absolute() else Path(root or Path.cwd()) / p


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
    """Load a task from a YAML path, or by name from ``evaluation/tasks/<name>.yaml``."""
    candidate = Path(path_or_name)
    if candidate.suffix in {".yaml", ".yml"} or candidate.is_file():
        path = candidate
        if not path.is_file():
            raise FileNotFoundError(f"task file not found: {path}")
    else:
        dirs = _candidate_dirs(tasks_dir)
        found = [d / f"{path_or_name}{ext}" for d in dirs for ext in (".yaml", ".yml")]
        found = [p for p in found if p.is_file()]
        if not found:
            known = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.y*ml")})
            raise FileNotFoundError(f"no task named {path_or_name!r} in {[str(d) for d in dirs]}; known: {known}")
        path = found[0]
    raw = load_yaml_text(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise TaskSpecError(f"{path}: expected a mapping at the top level")
    try:
        return TaskSpec.model_validate(raw)
    except ValidationError as e:
        raise TaskSpecError(f"{path}: invalid task spec\n{e}") from e


def _references(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise ValueError(f"{where}: reference must be a string, list or dict of strings")


def load_generation_items(spec: TaskSpec, root: str | Path | None = None) -> tuple[list[str], list[list[str]]]:
    """Prompts (template applied; chat template is applied later by ``generate``) and the
    reference list of each item, first ``spec.limit`` records of the JSONL file."""
    if spec.type != "generation" or spec.prompt is None:
        raise ValueError(f"task {spec.name!r} is not a generation task")
    path = spec.resolve_path(root)
    if not path.is_file():
        raise FileNotFoundError(f"task {spec.name!r}: data file not found: {path}")
    prompts, refs = [], []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if spec.limit is not None and len(prompts) >= spec.limit:
                break
            rec = json.loads(line)
            where = f"{path}:{line_no}"
            for field in (spec.data.input_field, spec.data.reference_field):
                if field not in rec:
                    raise ValueError(f"{where}: missing field {field!r} (have {sorted(rec)})")
            try:
                prompts.append(spec.prompt.template.format(**rec))
            except KeyError as e:
                raise ValueError(f"{where}: prompt.template uses field {e} missing in record") from e
            refs.append(_references(rec[spec.data.reference_field], where))
    return prompts, refs


__all__ = [
    "DataSpec",
    "GenerationSpec",
    "MMLUSpec",
    "MultipleChoicePrompt",
    "PromptSpec",
    "TaskSpec",
    "TaskSpecError",
    "compile_template",
    "load_generation_items",
    "load_task",
    "render_template",
]
