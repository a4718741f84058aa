"""Generation-based evaluation: greedy batched generation, corpus BLEU and ROUGE.

Metrics deliberately delegate to the reference implementations (sacrebleu, rouge-score) with
their standard settings, so numbers are comparable with published ones (WMT, DialogSum).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from align import distributed

References = Sequence[str | Sequence[str]]
ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _as_ref_lists(references: References, n_hyps: int) -> list[list[str]]:
    """Normalise references to one non-empty list of strings per item."""
    if len(references) != n_hyps:
        raise ValueError(f"{n_hyps} hypotheses but {len(references)} reference items")
    out = []
    for i, refs in enumerate(references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"item {i}: references must be a string or a non-empty list of strings")
        out.append(refs)
    return out


def bleu(hypotheses: Sequence[str], references: References, **sacrebleu_kwargs: Any) -> dict[str, Any]:
    """Corpus BLEU with sacrebleu's defaults (13a tokenizer, exp smoothing, cased).

    ``references[i]`` is item i's reference or list of references; items may have different
    numbers of references. sacrebleu wants reference *streams* (one list per reference index),
    so shorter items are padded with ``None``, which sacrebleu drops per segment.
    Extra keyword arguments go to ``sacrebleu.metrics.BLEU`` (e.g. ``tokenize="intl"``).
    """
    from sacrebleu.metrics import BLEU

    refs = _as_ref_lists(references, len(hypotheses))
    n_streams = max((len(r) for r in refs), default=1)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(n_streams)]
    metric = BLEU(**sacrebleu_kwargs)
    score = metric.corpus_score(list(hypotheses), streams)
    return {
        "score": score.score,
        "precisions": list(score.precisions),
        "bp": score.bp,
        "sys_len": score.sys_len,
        "ref_len": score.ref_len,
        "signature": str(metric.get_signature()),
    }


def rouge(
    hypotheses: Sequence[str],
    references: References,
    rouge_types: Sequence[str] = ROUGE_TYPES,
    use_stemmer: bool = True,
) -> dict[str, Any]:
    """Mean ROUGE F1 (x100) via rouge-score, plus per-item F1s.

    ROUGE-Lsum treats ``"\\n"`` as the sentence separator (rouge-score's default,
    ``split_summaries=False``): put one sentence per line for summary-level LCS.
    With several references per item, rouge-score's ``score_multi`` keeps, per ROUGE type,
    the reference with the highest F1 (the max over references).
    """
    from rouge_score.rouge_scorer import RougeScorer

    refs = _as_ref_lists(references, len(hypotheses))
    scorer = RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
    per_item = []
    for hyp, item_refs in zip(hypotheses, refs, strict=True):
        scores = scorer.score_multi(item_refs, hyp)
        per_item.append({t: scores[t].fmeasure * 100 for t in rouge_types})
    n = len(per_item)
    means = {t: (sum(s[t] for s in per_item) / n if n else float("nan")) for t in rouge_types}
    return {**means, "per_item": per_item}


def _render(tokenizer: Any, prompt: str, use_chat_template: bool) -> tuple[str, bool]:
    """Returns the text to tokenize and whether special tokens must still be added."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return text, False  # the template already holds BOS etc.
    return prompt, True


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    use_chat_template: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy completions for ``prompts`` (decoded new tokens only), in input order.

    Batches are left-padded (so every row's last prompt token is adjacent to its first new
    token) and formed from prompts of similar length to waste little compute on padding. The
    chat template is applied as a single user turn when the tokenizer has one and
    ``use_chat_template`` is set.
    """
    if not prompts:
        return []
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rendered = [_render(tokenizer, p, use_chat_template) for p in prompts]
    encoded = [tokenizer(text, add_special_tokens=add_special)["input_ids"] for text, add_special in rendered]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")

    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    computed: list[int] = []
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.inference_mode():
            for s in tqdm(
                range(0, len(order), batch_size),
                desc="generate",
                disable=not progress,
                total=(len(order) + batch_size - 1) // batch_size,
            ):
                if not distributed.mine(s // batch_size):
                    continue  # another rank generates this batch
                idx = order[s : s + batch_size]
                computed.extend(idx)
                width = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    n = len(encoded[i])
                    ids[row, width - n :] = torch.tensor(encoded[i])
                    mask[row, width - n :] = 1
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=pad_id,
                )
                for row, i in enumerate(idx):
                    outputs[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    if distributed.world_size() > 1:
        done = distributed.merge_gathered({i: outputs[i] for i in computed})
        outputs = [done[i] for i in range(len(prompts))]
    return outputs


__all__ = ["ROUGE_TYPES", "bleu", "generate", "rouge"]
