"""The generic multiple-choice engine alone: cached-prefix scores equal a plain full forward.

Runs on the tiny llama / GPT-2 of conftest.py (byte-level BPE trained on a small corpus, so
continuations split into different numbers of tokens). The reference is lm-eval's scoring written
out: ``enc(context)``, ``enc(context + continuation)[len(context_enc):]``, one forward over the
concatenation without any cache, summed ``log_softmax`` over the continuation tokens.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from align import distributed
from align.evaluation import multiple_choice
from align.evaluation.multiple_choice import (
    ChoiceRequest,
    _plan_rows,
    argmax,
    encode_pairs,
    length_normalized,
    score_choices,
)

SHOTS = "Add the two numbers.\nThe sum of 12 and 7 is 19.\n\nConvert 3 meters to centimeters.\n3 meters is 300.\n\n"
QUESTIONS = [
    "Spell the word apple letter by letter:",
    "The sum of 2 and 5 is",
    "Convert 7 meters to centimeters. Answer:",
    "Q",
]
CONTINUATIONS = [" A", " 7", " 700 centimeters.", " A-P-P-L-E", " user assistant system", "\n### Response:"]


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gpt2"])
def lm(request):
    """Both architectures, for the equality with a full forward."""
    return _load(request.getfixturevalue(request.param))


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return _load(tiny_llama)


def full_forward(model, tok, context: str, continuation: str) -> tuple[float, int]:
    ctx = tok(context)["input_ids"]
    cont = tok(context + continuation)["input_ids"][len(ctx) :]
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)), len(cont)


def requests(conts=CONTINUATIONS) -> list[ChoiceRequest]:
    return [ChoiceRequest(SHOTS + q, conts, group="shots") for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(lm) -> list[list[tuple[float, int]]]:
    model, tok = lm
    return [[full_forward(model, tok, r.context, c) for c in r.continuations] for r in requests()]


@pytest.mark.parametrize("split", [True, False], ids=["packed-split", "padded-cache"])
@pytest.mark.parametrize(("batch_size", "max_padding"), [(1, 0.15), (3, 0.15), (32, 10.0)])
def test_cached_prefix_equals_full_forward(
    lm, reference, batch_size: int, max_padding: float, split, monkeypatch
) -> None:
    """Every row length, alone or in a batch (32 rows, padding unbounded: one batch), on both
    paths: rows packed with split prefix/suffix attention, and left-padded against a DynamicCache."""
    model, tok = lm
    monkeypatch.setattr(multiple_choice, "_USE_SPLIT", split)
    reqs = requests()
    lengths = {
        len(tok(SHOTS + q + c)["input_ids"]) - len(tok(SHOTS + q)["input_ids"])
        for q in QUESTIONS
        for c in CONTINUATIONS
    }
    assert len(lengths) >= 4 and 1 in lengths  # single- and multi-token continuations of several lengths
    prefix, _, _ = _plan_rows(encode_pairs(tok, [r.context for r in reqs], [r.continuations for r in reqs]))
    assert len(prefix) > 10  # the few-shot block really is served from the cache
    got = score_choices(model, tok, reqs, batch_size=batch_size, max_padding=max_padding, progress=False)
    assert len(got) == len(reqs)
    for r, s, ref in zip(reqs, got, reference, strict=True):
        assert s.loglikelihoods == pytest.approx([ll for ll, _ in ref], abs=1e-4)
        assert s.num_tokens == tuple(n for _, n in ref)
        assert s.num_bytes == tuple(len(c.encode("utf-8")) for c in r.continuations)
        assert s.prediction == argmax([ll for ll, _ in ref])


def test_single_token_fast_path_equals_full_forward(lm) -> None:
    """All continuations one token (letters): one row per request, scored from its last position."""
    model, tok = lm
    letters = [
        c
        for c in (" A", " B", " C", " D", "A", "B")
        if len(tok("x" + c)["input_ids"]) - len(tok("x")["input_ids"]) == 1
    ]
    assert len(letters) >= 2
    reqs = requests(letters)
    got = score_choices(model, tok, reqs, batch_size=2, progress=False)
    for r, s in zip(reqs, got, strict=True):
        ref = [full_forward(model, tok, r.context, c)[0] for c in r.continuations]
        assert s.loglikelihoods == pytest.approx(ref, abs=1e-4)
        assert set(s.num_tokens) == {1}


def test_long_suffixes_against_long_prefix_equal_full_forward(lm, monkeypatch) -> None:
    """Long-prompt MMLU shape: a ~250-token shared prefix, question suffixes of very different
    lengths (tens to ~200 tokens), packed several to a batch; scores equal a full uncached
    forward of each sequence, and the split-attention path really ran (no fallback)."""
    model, tok = lm
    prefix = SHOTS * 4
    filler = "The sum of 12 and 7 is 19. Convert 3 meters to centimeters. "
    questions = [filler * k + q for k, q in zip((0, 1, 5, 3, 7, 2), QUESTIONS * 2, strict=False)]
    reqs = [ChoiceRequest(prefix + q, (" A", " 700 centimeters.", " B"), group="long") for q in questions]
    enc = encode_pairs(tok, [r.context for r in reqs], [r.continuations for r in reqs])
    pre, rows, _ = _plan_rows(enc)
    lengths = sorted(len(r.ids) for r in rows)
    assert len(pre) > 150 and lengths[0] <= 20 and lengths[-1] > 150 and len(pre) + lengths[-1] < 500

    def no_fallback(*args, **kwargs):
        raise AssertionError("the padded fallback ran")

    monkeypatch.setattr(multiple_choice._PrefixScorer, "_logprobs_padded", no_fallback)
    got = score_choices(model, tok, reqs, batch_size=4, progress=False)
    for r, s in zip(reqs, got, strict=True):
        ref = [full_forward(model, tok, r.context, c) for c in r.continuations]
        assert s.loglikelihoods == pytest.approx([ll for ll, _ in ref], abs=1e-4)
        assert s.num_tokens == tuple(n for _, n in ref)


def test_split_path_falls_back_when_attention_is_not_routed(llama, monkeypatch) -> None:
    """A model whose layers do not all come through the split attention (here: routed to plain
    SDPA, which sees one causal packed sequence without the prefix) is detected and scored by the
    padded path, same numbers."""
    model, tok = llama
    reqs = requests()
    want = score_choices(model, tok, reqs, batch_size=3, progress=False)
    monkeypatch.setattr(multiple_choice, "_split_available", lambda model, device: True)
    monkeypatch.setattr(multiple_choice, "_SPLIT_NAME", "sdpa")  # 0 calls reach the split attention
    got = score_choices(model, tok, reqs, batch_size=3, progress=False)
    assert model.config._attn_implementation == "sdpa"  # restored
    for a, b in zip(want, got, strict=True):
        assert b.loglikelihoods == pytest.approx(a.loglikelihoods, abs=1e-5)


def test_groups_batches_and_order_do_not_change_scores(llama) -> None:
    model, tok = llama
    reqs = requests() + [ChoiceRequest("Another context entirely.", (" A", " 19 is the sum"), group="other")]
    base = score_choices(model, tok, reqs, batch_size=4, progress=False)
    one_group = score_choices(model, tok, [ChoiceRequest(r.context, r.continuations) for r in reqs], progress=False)
    own_groups = score_choices(
        model,
        tok,
        [ChoiceRequest(r.context, r.continuations, group=i) for i, r in enumerate(reqs)],
        batch_size=1,
        progress=False,
    )
    reversed_ = score_choices(model, tok, reqs[::-1], batch_size=2, progress=False)[::-1]
    for a, *others in zip(base, one_group, own_groups, reversed_, strict=True):
        for b in others:
            assert b.loglikelihoods == pytest.approx(a.loglikelihoods, abs=1e-5)
            assert b.num_tokens == a.num_tokens


def test_trailing_context_whitespace_moves_to_the_continuation(llama) -> None:
    """lm-eval's _encode_pair: ("Answer: ", "A") is scored as ("Answer:", " A")."""
    model, tok = llama
    a, b = score_choices(
        model,
        tok,
        [ChoiceRequest(SHOTS + "Answer: ", ("A", "700")), ChoiceRequest(SHOTS + "Answer:", (" A", " 700"))],
        progress=False,
    )
    assert a.loglikelihoods == pytest.approx(b.loglikelihoods, abs=1e-5) and a.num_tokens == b.num_tokens


def test_sharded_batches_cover_everything_once(llama, monkeypatch) -> None:
    """Two simulated ranks: each scores whole batches (batch b on rank b mod 2, counted over all
    groups), the parts are disjoint, and together they are the one-process result."""
    model, tok = llama
    reqs = requests() + [ChoiceRequest("Another context.", (" A", " 19 is the sum"), group="other")]
    single = score_choices(model, tok, reqs, batch_size=2, progress=False)
    parts = []

    def fake_merge(part):
        parts.append(dict(part))
        return defaultdict(float, part)

    monkeypatch.setattr(distributed, "merge_gathered", fake_merge)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        score_choices(model, tok, reqs, batch_size=2, progress=False)
    assert all(parts) and not set(parts[0]) & set(parts[1])
    merged = {**parts[0], **parts[1]}
    want = {(i, c): v for i, s in enumerate(single) for c, v in enumerate(s.loglikelihoods)}
    assert merged.keys() == want.keys()
    for k, v in want.items():
        assert merged[k] == pytest.approx(v, rel=1e-9, abs=1e-9)


def test_model_mode_restored_and_edge_cases(llama) -> None:
    model, tok = llama
    model.train()
    try:
        score_choices(model, tok, requests()[:1], progress=False)
        assert model.training
    finally:
        model.eval()
    assert score_choices(model, tok, [], progress=False) == []
    with pytest.raises(ValueError, match="at least one continuation"):
        ChoiceRequest("ctx", ())


def test_argmax_and_length_normalisation() -> None:
    assert argmax([-2.0, -1.0, -1.0]) == 1  # first maximum, like np.argmax
    assert length_normalized([-4.0, -3.0], [4, 1]) == [-1.0, -3.0]
    assert argmax(length_normalized([-4.0, -3.0], [4, 1])) == 0
    assert length_normalized([-1.0], [0]) == [float("-inf")]


# --------------------------------------------------------------------------- shared segments (clusters)

PASSAGES = [
    "Read the passage. The sum of 12 and 7 is 19, and 3 meters are 300 centimeters; a student wrote both "
    "results on the board and spelled apple letter by letter for the class. ",
    "Another passage. Convert 7 meters to centimeters and add the two numbers twice, then write the sum of "
    "2 and 5 and the word apple on a new line of the page. ",
    "A third passage: 12 and 7, 3 meters, 700 centimeters, and the letters A P P L E in order on the board. ",
]


def _row(ids, cont_len=1):
    return multiple_choice._Row(list(ids), [(0, 0, [0] * cont_len)])


def test_plan_clusters_takes_shared_runs_that_save_tokens() -> None:
    """Rows that share >= 32 leading tokens form one cluster; a neighbour sharing fewer tokens than the
    cluster would lose is left alone (nested case); the scored positions always stay in the row."""
    from align.evaluation.multiple_choice import _plan_clusters

    rows = [
        _row([1] * 50 + [2, 3]),  # 0 \ 50 shared
        _row([1] * 50 + [4, 5]),  # 1 /
        _row([1] * 10 + [9] * 40),  # 2: 10 shared with 0/1: below the threshold
        _row([5] * 100 + [1]),  # 3 \ 100 shared
        _row([5] * 100 + [2]),  # 4 /
        _row([5] * 40 + [6] * 60),  # 5: 40 shared with 3/4: 2 x 40 saves less than 100
        _row([8] * 40),  # 6 \ identical rows: cap = len - 1
        _row([8] * 40),  # 7 /
        _row([7] * 45 + [1, 2, 3, 4, 5], cont_len=5),  # 8 \ multi-token target: cap = len - 5
        _row([7] * 45 + [1, 2, 3, 4, 6], cont_len=5),  # 9 /
    ]
    clusters = _plan_clusters(rows)
    assert sorted(sorted(c) for c in clusters) == [[0, 1], [3, 4], [6, 7], [8, 9]]
    assert [r.skip for r in rows] == [50, 50, 0, 100, 100, 0, 39, 39, 45, 45]
    assert rows[2].cluster is None and rows[5].cluster is None
    assert rows[0].cluster == rows[1].cluster != rows[3].cluster


@pytest.mark.parametrize("batch_size", [3, 16])
def test_shared_passages_run_once_and_equal_full_forward(lm, batch_size, monkeypatch) -> None:
    """MMLU history shape: several questions on one reading passage (and a cloze-style request whose
    choice rows share the whole question). Each passage after the shared few-shot block is run once
    (one segment forward per cluster, also when its rows span batches), the packed path never falls
    back, and every score equals a full uncached forward."""
    model, tok = lm
    from align.evaluation.multiple_choice import _plan_clusters

    prefix = SHOTS * 2
    layout = [(0, QUESTIONS[0]), (1, QUESTIONS[1]), (0, QUESTIONS[2]), (2, QUESTIONS[3]), (1, QUESTIONS[3])]
    layout += [(0, QUESTIONS[3]), (1, QUESTIONS[0])]
    reqs = [ChoiceRequest(prefix + PASSAGES[p] + q, (" A", " B", " C"), group="g") for p, q in layout]
    reqs.append(ChoiceRequest(prefix + PASSAGES[2] + "Spell it:", (" A-P-P-L-E", " 700 centimeters.", " 19"), "g"))
    enc = encode_pairs(tok, [r.context for r in reqs], [r.continuations for r in reqs])
    _, rows, _ = _plan_rows(enc)
    clusters = _plan_clusters(rows)
    # one cluster per passage, holding every row of every request on it (passage 2: its question and
    # the cloze request, whose multi-token choices are a row each)
    passage_of = [p for p, _ in layout] + [2]
    by_passage = {p: sorted(k for k, r in enumerate(rows) if passage_of[r.targets[0][0]] == p) for p in range(3)}
    assert sorted(sorted(c) for c in clusters) == sorted(by_passage.values())
    assert all(r.skip >= 32 for r in rows)

    segment_forwards = []
    real_forward = multiple_choice._PrefixScorer._forward_split

    def spy(self, runs, keep_idx, state):
        if state.capture is not None:
            segment_forwards.append(len(runs[0][0]))
        return real_forward(self, runs, keep_idx, state)

    def no_fallback(*args, **kwargs):
        raise AssertionError("the padded fallback ran")

    monkeypatch.setattr(multiple_choice._PrefixScorer, "_forward_split", spy)
    monkeypatch.setattr(multiple_choice._PrefixScorer, "_logprobs_padded", no_fallback)
    got = score_choices(model, tok, reqs, batch_size=batch_size, progress=False)
    assert len(segment_forwards) == len(clusters)
    for r, s in zip(reqs, got, strict=True):
        ref = [full_forward(model, tok, r.context, c) for c in r.continuations]
        assert s.loglikelihoods == pytest.approx([ll for ll, _ in ref], abs=1e-4)
        assert s.num_tokens == tuple(n for _, n in ref)

    # the padded path (no clusters) gives the same numbers
    monkeypatch.setattr(multiple_choice, "_USE_SPLIT", False)
    monkeypatch.setattr(multiple_choice._PrefixScorer, "_logprobs_padded", real_padded)
    plain = score_choices(model, tok, reqs, batch_size=batch_size, progress=False)
    for a, b in zip(got, plain, strict=True):
        assert a.loglikelihoods == pytest.approx(b.loglikelihoods, abs=1e-4)


real_padded = multiple_choice._PrefixScorer._logprobs_padded
