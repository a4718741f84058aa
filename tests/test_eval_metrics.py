"""BLEU/ROUGE wrappers against the reference libraries and hand-worked values; stderr formulas."""

from __future__ import annotations

import math

import pytest
import sacrebleu
from rouge_score.rouge_scorer import RougeScorer

from align.evaluation.generation import bleu, rouge
from align.evaluation.metrics import mean, mean_stderr, pooled_stderr, sample_stddev, weighted_mean

HYP = "the cat sat on the mat"
REF = "the cat sat on a mat"


def test_bleu_identical_and_disjoint() -> None:
    assert bleu(["a b c d e f"], ["a b c d e f"])["score"] == pytest.approx(100.0)
    assert bleu(["a b c d e f"], [["u v w x y z"]])["score"] == pytest.approx(0.0)


def test_bleu_hand_computed() -> None:
    # n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths so BP = 1
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    res = bleu([HYP], [REF])
    assert res["score"] == pytest.approx(expected, abs=1e-9)
    assert res["bp"] == 1.0
    assert res["precisions"] == pytest.approx([500 / 6, 60.0, 50.0, 100 / 3])
    assert "tok:13a" in res["signature"]


def test_bleu_equals_sacrebleu_multi_and_variable_refs() -> None:
    hyps = ["The goods cost under 20 euros.", "The fee is 40% of the goods.", "Hello there!"]
    refs_a = ["The goods cost less than 20 euros.", "The fee equals 40% of the value.", "Hi!"]
    refs_b = ["The merchandise was less than 20 EURO.", "The fee is 40 % of the goods' value."]
    items = [[refs_a[0], refs_b[0]], [refs_a[1], refs_b[1]], [refs_a[2]]]
    direct = sacrebleu.corpus_bleu(hyps, [refs_a, [*refs_b, None]])
    assert bleu(hyps, items)["score"] == pytest.approx(direct.score, abs=1e-9)
    # same number of references everywhere: plain sacrebleu streams
    two = sacrebleu.corpus_bleu(hyps[:2], [refs_a[:2], refs_b])
    assert bleu(hyps[:2], items[:2])["score"] == pytest.approx(two.score, abs=1e-9)
    # a single string per item is a single reference
    assert bleu(hyps, refs_a)["score"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs_a]).score)
    with pytest.raises(ValueError, match="3 hypotheses but 2"):
        bleu(hyps, refs_a[:2])


def test_rouge_hand_worked_pair() -> None:
    hyp, ref = "the cat sat on the mat", "the cat was on the mat"
    res = rouge([hyp], [ref])
    # unigrams: overlap the x2, cat, on, mat = 5 of 6 on both sides -> P = R = F = 5/6
    assert res["rouge1"] == pytest.approx(100 * 5 / 6)
    # bigrams: "the cat", "on the", "the mat" = 3 of 5
    assert res["rouge2"] == pytest.approx(100 * 3 / 5)
    # LCS "the cat on the mat" = 5 of 6
    assert res["rougeL"] == pytest.approx(100 * 5 / 6)
    assert res["per_item"][0]["rouge1"] == pytest.approx(100 * 5 / 6)


def test_rouge_stemming_lsum_and_multi_reference() -> None:
    assert rouge(["cats running"], ["cat runs"])["rouge1"] == pytest.approx(100.0)
    assert rouge(["cats running"], ["cat runs"], use_stemmer=False)["rouge1"] == pytest.approx(0.0)
    hyps = ["a b c.\nd e f.", "x y z"]
    refs = [["d e f.\na b c."], ["x y", "q r s"]]
    res = rouge(hyps, refs)
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for t in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        direct = [scorer.score_multi(r, h)[t].fmeasure * 100 for h, r in zip(hyps, refs, strict=True)]
        assert res[t] == pytest.approx(sum(direct) / 2)
    # newline-split sentences: summary-level LCS finds both sentences despite the order swap
    assert res["per_item"][0]["rougeLsum"] == pytest.approx(100.0)
    assert res["per_item"][0]["rougeL"] < 100.0
    # max over references: "x y" (F = 0.8) beats "q r s" (0)
    assert res["per_item"][1]["rouge1"] == pytest.approx(80.0)


def test_stderr_formulas_hand_values() -> None:
    values = [1, 0, 1, 1]  # p = 0.75, n = 4
    assert mean(values) == 0.75
    assert sample_stddev(values) == pytest.approx(math.sqrt(0.75 / 3))
    assert mean_stderr(values) == pytest.approx(math.sqrt(0.75 * 0.25 / 3))  # = 0.25
    assert mean_stderr(values) == pytest.approx(0.25)
    assert math.isnan(mean_stderr([1.0]))
    # lm-eval pooled_sample_stderr: sqrt(sum((n-1) se^2 n) / (N-k) / N)
    # (3 * 0.0625 * 4 + 1 * 0.25 * 2) / (6 - 2) = 0.3125 ; sqrt(0.3125 / 6)
    assert pooled_stderr([0.25, 0.5], [4, 2]) == pytest.approx(math.sqrt(0.3125 / 6))
    assert pooled_stderr([0.25], [4]) == pytest.approx(0.25)  # one group: unchanged
    assert weighted_mean([0.5, 1.0], [2, 6]) == pytest.approx(7 / 8)
