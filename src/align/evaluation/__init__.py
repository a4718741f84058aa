"""Evaluation library used by the recipe ``eval`` stage.

Modules (imported lazily so that config validation does not pull in torch):

* ``tasks``: task definitions as data (``evaluation/tasks/*.yaml``), ``load_task``.
* ``runner``: ``run_task(spec, model, tokenizer)`` for ``mmlu`` and ``generation`` tasks.
* ``mmlu``: MMLU loading, lm-eval-parity prompts, KV-cached log-likelihood scoring.
* ``generation``: greedy batched ``generate``, sacrebleu ``bleu``, rouge-score ``rouge``.
* ``metrics``: mean / stderr helpers matching lm-eval's formulas.
* ``perplexity``: perplexity of texts.
"""
