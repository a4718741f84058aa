"""Perplexity: hand-computed NLL, the sliding window, and prefix (prompt) masking."""

from __future__ import annotations

import math

import torch
from test_eval_mmlu import make_model, make_tokenizer

from align.evaluation.perplexity import perplexity

TEXT = "the other ones were there, then the three threw their things there."
PREFIX = "the other ones were there,"


def manual_nll(model, ids: list[int], first_scored: int) -> tuple[float, int]:
    """Sum of -log p(token_t | tokens_<t) for t >= first_scored, one full-context forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    nll = -sum(logp[t - 1, ids[t]].item() for t in range(max(first_scored, 1), len(ids)))
    return nll, len(ids) - max(first_scored, 1)


def test_matches_hand_computed_and_masks_prefix() -> None:
    tok = make_tokenizer()
    model = make_model(len(tok)).eval()
    ids = tok(TEXT)["input_ids"]
    skip = len(tok(PREFIX)["input_ids"])

    r = perplexity(model, tok, [TEXT], max_length=512, stride=256)
    nll, n = manual_nll(model, ids, 1)
    assert r.tokens == n == len(ids) - 1
    assert math.isclose(r.nll, nll / n, rel_tol=1e-5)
    assert math.isclose(r.perplexity, math.exp(nll / n), rel_tol=1e-5)

    rp = perplexity(model, tok, [(PREFIX, TEXT)], max_length=512, stride=256)
    nll_p, n_p = manual_nll(model, ids, skip)
    assert rp.tokens == n_p == len(ids) - skip  # prompt tokens are context, not scored
    assert math.isclose(rp.nll, nll_p / n_p, rel_tol=1e-5)
    assert rp.nll != r.nll


def test_sliding_window_scores_every_token_once() -> None:
    tok = make_tokenizer()
    model = make_model(len(tok)).eval()
    ids = tok(TEXT)["input_ids"]
    skip = len(tok(PREFIX)["input_ids"])
    assert len(ids) > 24
    full = perplexity(model, tok, [TEXT], max_length=512)
    for max_length, stride in [(16, 8), (12, 5), (10, 10)]:
        r = perplexity(model, tok, [TEXT], max_length=max_length, stride=stride, batch_size=3)
        assert r.tokens == len(ids) - 1, (max_length, stride)
        assert r.nll != full.nll  # less left context, different numbers
        rp = perplexity(model, tok, [(PREFIX, TEXT)], max_length=max_length, stride=stride)
        assert rp.tokens == len(ids) - skip, (max_length, stride)
    # batching and padding do not change the result
    a = perplexity(model, tok, [TEXT, (PREFIX, TEXT), "there"], max_length=16, stride=8, batch_size=1)
    b = perplexity(model, tok, [TEXT, (PREFIX, TEXT), "there"], max_length=16, stride=8, batch_size=8)
    assert a.tokens == b.tokens and math.isclose(a.nll, b.nll, rel_tol=1e-5)
