"""Run one :class:`~align.evaluation.tasks.TaskSpec` on a model: the glue the eval stage calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align.evaluation.tasks import TaskSpec, load_generation_items


def run_task(
    spec: TaskSpec,
    model: Any,
    tokenizer: Any,
    root: str | Path | None = None,
    device: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``spec`` and return a JSON-able dict: ``{task, version, type, metric, score, ...}``.

    ``score`` is the headline number (accuracy in %, under the task's ``mmlu.normalize``; BLEU, or
    mean ROUGE-L F1 x100 for rouge, with every ROUGE type also reported). Perplexity tasks live in
    ``perplexity.py``.
    """
    head = {"task": spec.name, "version": spec.version, "type": spec.type}
    if spec.type == "mmlu":
        from align.evaluation.mmlu import evaluate_mmlu, load_mmlu

        data = load_mmlu(
            spec.data_source(root),
            spec.data.subjects,
            limit=spec.limit,
            require_dev=spec.mmlu.num_fewshot > 0,
            file_format="csv" if spec.data.format == "mmlu_csv" else "jsonl",
        )
        res = evaluate_mmlu(
            model,
            tokenizer,
            data,
            num_fewshot=spec.mmlu.num_fewshot,
            batch_size=spec.batch_size,
            device=device,
            progress=progress,
            prompt_format=spec.mmlu,
        )
        return {
            **head,
            "metric": "accuracy",
            "normalize": spec.mmlu.normalize,
            "score": 100 * res.aggregate.accuracy,
            "stderr": 100 * res.aggregate.stderr,
            "n": res.aggregate.n,
            "per_subject": {
                k: {"accuracy": 100 * s.accuracy, "stderr": 100 * s.stderr, "n": s.n}
                for k, s in res.per_subject.items()
            },
            "seconds": res.seconds,
        }
    if spec.type == "generation":
        from align.evaluation.generation import generate

        prompts, refs = load_generation_items(spec, root)
        hyps = generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=spec.generation.max_new_tokens,
            batch_size=spec.batch_size,
            use_chat_template=spec.prompt.use_chat_template,
            device=device,
            progress=progress,
        )
        from align.evaluation.score import score_outputs

        return {**head, **score_outputs(spec, hyps, refs), "predictions": hyps}
    raise NotImplementedError(f"task type {spec.type!r} is evaluated by align.evaluation.perplexity, not run_task")


__all__ = ["run_task"]
