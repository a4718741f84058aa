"""MMLU data loading, lm-eval prompt format, and the KV-cached scorer vs naive scoring.

Also holds the ``generate`` tests, which need the same tiny locally built model/tokenizer.
The tokenizer is a hand-built byte-level BPE (deterministic, unlike training one): with the
``"Ġ D"`` merge left out, ``" D"`` is two tokens, which forces the multi-token fallback; the
``"Ċ Ċ"`` merge makes ``"\\n\\n"`` tokenize differently at the end of the few-shot prefix than
inside the full prompt, the boundary case the common-prefix cache must get right.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, processors
from tokenizers.pre_tokenizers import ByteLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from align.evaluation.generation import generate
from align.evaluation.mmlu import (
    MMLUQuestion,
    MMLUSubject,
    _plan_rows,
    build_prompt,
    encode_pairs,
    evaluate_mmlu,
    load_mmlu,
)

# --------------------------------------------------------------------------- fixtures


def make_tokenizer(single_token_d: bool = True) -> PreTrainedTokenizerFast:
    vocab = {"<s>": 0, "</s>": 1, "<pad>": 2}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = [("Ġ", "A"), ("Ġ", "B"), ("Ġ", "C"), ("Ċ", "Ċ"), ("e", "r"), ("Ġ", "t"), ("Ġt", "h")]
    if single_token_d:
        merges.append(("Ġ", "D"))
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return make_model(len(tok))


def toy_subject() -> MMLUSubject:
    dev = [
        MMLUQuestion("What is 1+1?", ("1", "2", "3", "4"), 1),
        MMLUQuestion(" Which is a colour? ", ("red", "dog", "run", "up"), 0),
        MMLUQuestion("Unused third shot", ("a", "b", "c", "d"), 3),
    ]
    test = [
        MMLUQuestion("  Pick the largest number.", ("7", "70", "700", "7000"), 3),
        MMLUQuestion("Which word is a verb?", (" table", "quickly", "the", "jump "), 3),
        MMLUQuestion("The sky is usually what colour on a clear day?", ("green", "blue", "x", "y"), 1),
    ]
    return MMLUSubject("toy_subject", test, dev)


def naive_loglik(model, tok, context: str, continuation: str) -> float:
    """lm-eval's scoring written out directly: one full forward over context + continuation."""
    ctx = tok(context)["input_ids"]
    whole = tok(context + continuation)["input_ids"]
    cont = whole[len(ctx) :]
    with torch.no_grad():
        logits = model(torch.tensor([(ctx + cont)[:-1]])).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


# --------------------------------------------------------------------------- prompt


def test_prompt_matches_lm_eval_format_two_shot() -> None:
    subj = toy_subject()
    expected = (
        "The following are multiple choice questions (with answers) about toy subject.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Which is a colour?\nA. red\nB. dog\nC. run\nD. up\nAnswer: A\n\n"
        "Which word is a verb?\nA.  table\nB. quickly\nC. the\nD. jump \nAnswer:"
    )
    assert build_prompt(subj, subj.test[1], num_fewshot=2) == expected
    zero = build_prompt(subj, subj.test[0], num_fewshot=0)
    assert zero == (
        "The following are multiple choice questions (with answers) about toy subject.\n\n"
        "Pick the largest number.\nA. 7\nB. 70\nC. 700\nD. 7000\nAnswer:"
    )
    with pytest.raises(ValueError, match="only 3 dev rows"):
        build_prompt(subj, subj.test[0], num_fewshot=5)


# --------------------------------------------------------------------------- loading


CSV_TEST = 'Q one?,a,b,c,d,B\n"Q, two?",x,"y, z",w,v,D\n'
CSV_DEV = "Shot?,1,2,3,4,A\n"


def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_load_csv_and_cais_jsonl_agree(tmp_path) -> None:
    _write(tmp_path / "csv/test/astro_test.csv", CSV_TEST)
    _write(tmp_path / "csv/dev/astro_dev.csv", CSV_DEV)
    recs = [
        {"question": "Q one?", "choices": ["a", "b", "c", "d"], "answer": 1},
        {"question": "Q, two?", "choices": ["x", "y, z", "w", "v"], "answer": 3},
    ]
    dev = [{"question": "Shot?", "choices": ["1", "2", "3", "4"], "answer": 0}]
    _write(tmp_path / "js/test/astro_test.jsonl", "".join(json.dumps(r) + "\n" for r in recs))
    _write(tmp_path / "js/dev/astro_dev.jsonl", "".join(json.dumps(r) + "\n" for r in dev))
    one = [{**r, "subject": "astro"} for r in recs]
    _write(tmp_path / "all_test.jsonl", "".join(json.dumps(r) + "\n" for r in one))
    _write(tmp_path / "all_dev.jsonl", json.dumps({**dev[0], "subject": "astro"}) + "\n")

    a = load_mmlu(tmp_path / "csv")
    b = load_mmlu(tmp_path / "js", ["astro"])
    c = load_mmlu({"test": tmp_path / "all_test.jsonl", "dev": tmp_path / "all_dev.jsonl"})
    assert list(a) == ["astro"]
    assert a["astro"] == b["astro"] == c["astro"]
    assert a["astro"].test[1] == MMLUQuestion("Q, two?", ("x", "y, z", "w", "v"), 3)
    assert len(load_mmlu(tmp_path / "csv", limit=1)["astro"].test) == 1
    with pytest.raises(FileNotFoundError, match=r"test/<subject>_test.jsonl"):
        load_mmlu(tmp_path / "csv", file_format="jsonl")


def test_load_errors_name_file_and_field(tmp_path) -> None:
    _write(tmp_path / "test/astro_test.csv", CSV_TEST)
    with pytest.raises(FileNotFoundError, match=r"dev/astro_dev"):
        load_mmlu(tmp_path, ["astro"])
    with pytest.raises(FileNotFoundError, match=r"test/geo_test"):
        load_mmlu(tmp_path, ["geo"], require_dev=False)
    _write(tmp_path / "bad/test/s_test.jsonl", json.dumps({"question": "q", "answer": 0}) + "\n")
    with pytest.raises(ValueError, match=r"s_test.jsonl:1: missing field 'choices'"):
        load_mmlu(tmp_path / "bad", require_dev=False)
    _write(tmp_path / "short/test/s_test.csv", "q,a,b,c,A\n")
    with pytest.raises(ValueError, match=r"s_test.csv:1: expected 6 columns"):
        load_mmlu(tmp_path / "short", require_dev=False)


# --------------------------------------------------------------------------- scoring


def test_lm_eval_tokenization_pairs(tok) -> None:
    ((ctx, conts),) = encode_pairs(tok, ["Q\nAnswer:"], [[" A", " D"]])
    assert ctx[0] == tok.bos_token_id  # tokenizer default special tokens, like lm-eval 0.4.13
    assert conts == [[tok.convert_tokens_to_ids("ĠA")], [tok.convert_tokens_to_ids("ĠD")]]
    # trailing whitespace of the context moves into the continuation
    ((ctx2, conts2),) = encode_pairs(tok, ["Q\nAnswer: "], [["A"]])
    assert ctx2 == ctx and conts2 == [[tok.convert_tokens_to_ids("ĠA")]]


@pytest.mark.parametrize("single_token_d", [True, False])
def test_cached_scorer_matches_naive(single_token_d: bool) -> None:
    tok = make_tokenizer(single_token_d)
    model = make_model(len(tok), seed=1)
    subj = toy_subject()
    contexts = [build_prompt(subj, q, 2) for q in subj.test]
    encoded = encode_pairs(tok, contexts, [[" A", " B", " C", " D"]] * len(contexts))
    prefix, rows, n_fast = _plan_rows(encoded)
    assert n_fast == (3 if single_token_d else 0)
    assert len(rows) == (3 if single_token_d else 12)
    # the "\n\n" merge: the shared prefix stops before the last shot's "\n\n" token
    assert len(prefix) < len(tok(build_prompt(subj, subj.test[0], 2)[: -len("Answer:")])["input_ids"])

    res = evaluate_mmlu(model, tok, {"toy_subject": subj}, num_fewshot=2, batch_size=2)
    assert [p.index for p in res.predictions] == [0, 1, 2]
    for p, ctx in zip(res.predictions, contexts, strict=True):
        expected = [naive_loglik(model, tok, ctx, f" {c}") for c in "ABCD"]
        assert p.loglikelihoods == pytest.approx(expected, abs=1e-4)
        assert p.prediction == max(range(4), key=lambda c: expected[c])
    acc = sum(p.correct for p in res.predictions) / 3
    assert res.per_subject["toy_subject"].accuracy == pytest.approx(acc)
    assert res.per_subject["toy_subject"].n == 3


def test_batch_size_and_subjects_do_not_change_scores(tok, model) -> None:
    subj = toy_subject()
    other = MMLUSubject("other", subj.test[:2], subj.dev)
    data = {"toy_subject": subj, "other": other}
    r1 = evaluate_mmlu(model, tok, data, num_fewshot=1, batch_size=1, progress=False)
    r3 = evaluate_mmlu(model, tok, data, num_fewshot=1, batch_size=3, progress=False)
    for a, b in zip(r1.predictions, r3.predictions, strict=True):
        assert a.loglikelihoods == pytest.approx(b.loglikelihoods, abs=1e-5)
    accs = [r1.per_subject[k].accuracy for k in data]
    assert r1.aggregate.n == 5
    assert r1.aggregate.accuracy == pytest.approx((3 * accs[0] + 2 * accs[1]) / 5)


def test_peft_wrapped_model(tok) -> None:
    peft = pytest.importorskip("peft")
    base = make_model(len(tok), seed=2)
    subj = toy_subject()
    plain = evaluate_mmlu(base, tok, {"s": subj}, num_fewshot=1, progress=False)
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(base, cfg)  # LoRA B=0 at init: same function
    lora = evaluate_mmlu(wrapped, tok, {"s": subj}, num_fewshot=1, progress=False)
    for a, b in zip(plain.predictions, lora.predictions, strict=True):
        assert a.loglikelihoods == pytest.approx(b.loglikelihoods, abs=1e-5)


# --------------------------------------------------------------------------- generate


def test_generate_left_padded_batch_equals_single(tok, model) -> None:
    prompts = ["Q: 1+1?\nA:", "A much longer prompt about the weather today.\nAnswer:", "Hi"]
    batched = generate(model, tok, prompts, max_new_tokens=6, batch_size=3, progress=False)
    single = [generate(model, tok, [p], max_new_tokens=6, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(s, str) for s in batched)
    assert tok.padding_side == "right"  # generate must not leave the tokenizer modified


def test_generate_chat_template_used_only_when_asked(model, monkeypatch) -> None:
    tok = make_tokenizer()
    tok.chat_template = "{% for m in messages %}<s>U:{{ m['content'] }}\n{% endfor %}B:"
    seen = []
    orig = type(tok).__call__

    def spy(self, text, *a, **k):
        seen.append((text, k.get("add_special_tokens")))
        return orig(self, text, *a, **k)

    monkeypatch.setattr(type(tok), "__call__", spy)
    generate(model, tok, ["hello"], max_new_tokens=1, use_chat_template=True, progress=False)
    generate(model, tok, ["hello"], max_new_tokens=1, use_chat_template=False, progress=False)
    # the template already carries BOS; the plain prompt gets the tokenizer's special tokens
    assert seen == [("<s>U:hello\nB:", False), ("hello", True)]


def test_stderr_reported_like_lm_eval(tok, model) -> None:
    subj = toy_subject()
    res = evaluate_mmlu(model, tok, {"s": subj}, num_fewshot=0, progress=False)
    p = res.per_subject["s"].accuracy
    expected = math.sqrt(p * (1 - p) / 2) if 0 < p < 1 else 0.0
    assert res.per_subject["s"].stderr == pytest.approx(expected)


def test_length_batches_bound_padding() -> None:
    from align.evaluation.mmlu import _length_batches, _Row

    rows = [_Row([0] * n, []) for n in (10, 100, 48, 95, 50)]
    got = [[len(r.ids) for r in b] for b in _length_batches(rows, 16, 0.15)]
    assert got == [[100, 95], [50, 48], [10]]
    got = [[len(r.ids) for r in b] for b in _length_batches(rows, 2, 10.0)]
    assert got == [[100, 95], [50, 48], [10]]


def test_run_task_mmlu_and_generation(tmp_path, tok, model) -> None:
    from align.evaluation.runner import run_task
    from align.evaluation.tasks import load_task

    _write(tmp_path / "mmlu/test/astro_test.csv", CSV_TEST)
    _write(tmp_path / "mmlu/dev/astro_dev.csv", CSV_DEV)
    _write(
        tmp_path / "mmlu.yaml",
        "name: m\ntype: mmlu\ndata: {path: mmlu, format: mmlu_csv}\nmmlu: {num_fewshot: 1}\n",
    )
    res = run_task(load_task(tmp_path / "mmlu.yaml"), model, tok, root=tmp_path, progress=False)
    assert res["metric"] == "accuracy" and res["n"] == 2 and set(res["per_subject"]) == {"astro"}
    assert 0 <= res["score"] <= 100

    _write(tmp_path / "mt.jsonl", json.dumps({"src": "Hallo", "refs": {"A": "Hello", "B": "Hi"}}) + "\n")
    _write(
        tmp_path / "mt.yaml",
        "name: mt\ntype: generation\ndata: {path: mt.jsonl, format: jsonl, input_field: src, "
        "reference_field: refs}\nprompt: {template: 'T: {src}'}\ngeneration: {max_new_tokens: 3}\n"
        "metric: {name: rouge}\n",
    )
    res = run_task(load_task(tmp_path / "mt.yaml"), model, tok, root=tmp_path, progress=False)
    assert res["metric"] == "rouge" and res["n"] == 1 and len(res["predictions"]) == 1
    assert set(res) >= {"rouge1", "rouge2", "rougeL", "rougeLsum", "score"}


# --------------------------------------------------------------------------- prompt format from the task YAML


def _tasks_dir():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "evaluation" / "tasks"


def test_shipped_yaml_states_the_default_format() -> None:
    """mmlu_shared5.yaml spells every prompt field out; they equal the defaults, so a task file
    without them gives byte-identical prompts."""
    from align.evaluation.tasks import MMLUSpec, load_task

    spec = load_task(_tasks_dir() / "mmlu_shared5.yaml")
    assert spec.mmlu == MMLUSpec()
    assert spec.mmlu.model_fields_set >= {"description", "doc_to_text", "choices", "choice_labels", "normalize"}
    subj = toy_subject()
    for k in (0, 2):
        assert build_prompt(subj, subj.test[1], k, fmt=spec.mmlu) == build_prompt(subj, subj.test[1], k)


def test_cloze_yaml_prompt_and_length_normalised_scores(tok, model) -> None:
    from align.evaluation.mmlu import mmlu_requests
    from align.evaluation.tasks import load_task

    spec = load_task("mmlu_shared5_cloze", tasks_dir=_tasks_dir())
    assert (spec.mmlu.choices, spec.mmlu.normalize) == ("texts", "chars")
    subj = toy_subject()
    reqs = mmlu_requests({"toy_subject": subj}, 2, spec.mmlu)
    assert reqs[1].context == (
        "The following are questions (with answers) about toy subject.\n\n"
        "Question: What is 1+1?\nAnswer: 2\n\n"
        "Question: Which is a colour?\nAnswer: red\n\n"
        "Question: Which word is a verb?\nAnswer:"
    )
    assert reqs[1].continuations == ("  table", " quickly", " the", " jump ")  # target_delimiter + text

    res = evaluate_mmlu(model, tok, {"toy_subject": subj}, num_fewshot=2, progress=False, prompt_format=spec.mmlu)
    assert res.normalize == "chars"
    for p, r, q in zip(res.predictions, reqs, subj.test, strict=True):
        expected = [naive_loglik(model, tok, r.context, c) for c in r.continuations]
        assert p.loglikelihoods == pytest.approx(expected, abs=1e-4)
        assert all(n > 1 for n in p.num_tokens)  # answer texts: multi-token continuations
        assert p.prediction == max(range(4), key=lambda c: (expected[c] / len(q.choices[c]), -c))  # acc_norm

    def run(normalize: str):
        fmt = spec.mmlu.model_copy(update={"normalize": normalize})
        return evaluate_mmlu(model, tok, {"toy_subject": subj}, 2, progress=False, prompt_format=fmt)

    raw = run("none")
    assert [p.loglikelihoods for p in raw.predictions] == [p.loglikelihoods for p in res.predictions]
    for p in raw.predictions:
        assert p.prediction == max(range(4), key=lambda c: (p.loglikelihoods[c], -c))
    per_token = run("tokens")
    for p in per_token.predictions:
        assert p.prediction == max(range(4), key=lambda c: (p.loglikelihoods[c] / p.num_tokens[c], -c))


def test_fewshot_row_equal_to_the_question_is_dropped(tok, model) -> None:
    """lm-eval's get_context: a drawn shot equal to the evaluated doc is removed (not replaced)."""
    subj = toy_subject()
    dup = MMLUSubject("toy_subject", [subj.dev[0], subj.test[0]], subj.dev)
    prompt = build_prompt(dup, dup.test[0], num_fewshot=2)
    assert prompt == (
        "The following are multiple choice questions (with answers) about toy subject.\n\n"
        "Which is a colour?\nA. red\nB. dog\nC. run\nD. up\nAnswer: A\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    )
    assert build_prompt(dup, dup.test[1], 2) == build_prompt(subj, subj.test[0], 2)  # others keep both shots
    res = evaluate_mmlu(model, tok, {"toy_subject": dup}, num_fewshot=2, progress=False)
    for p, q in zip(res.predictions, dup.test, strict=True):
        expected = [naive_loglik(model, tok, build_prompt(dup, q, 2), f" {c}") for c in "ABCD"]
        assert p.loglikelihoods == pytest.approx(expected, abs=1e-4)


def test_custom_labels_delimiters_and_description(tok, model) -> None:
    from align.evaluation.tasks import MMLUSpec

    fmt = MMLUSpec(
        description="Subject: {{subject}}\n",
        doc_to_text="Q: {{question.strip()}}\n{% for c in choices %}({{labels[loop.index0]}}) {{c}}\n{% endfor %}A:",
        choice_labels=["1", "2", "3", "4"],
        target_delimiter="",
        fewshot_delimiter="\n---\n",
    )
    subj = toy_subject()
    assert build_prompt(subj, subj.test[2], 1, fmt=fmt) == (
        "Subject: toy_subject\n"
        "Q: What is 1+1?\n(1) 1\n(2) 2\n(3) 3\n(4) 4\nA:2\n---\n"
        "Q: The sky is usually what colour on a clear day?\n(1) green\n(2) blue\n(3) x\n(4) y\nA:"
    )
    res = evaluate_mmlu(model, tok, {"toy_subject": subj}, num_fewshot=1, progress=False, prompt_format=fmt)
    for p, q in zip(res.predictions, subj.test, strict=True):
        expected = [naive_loglik(model, tok, build_prompt(subj, q, 1, fmt=fmt), c) for c in "1234"]
        assert p.loglikelihoods == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match="choice_labels has 3 labels"):
        evaluate_mmlu(model, tok, {"s": subj}, 0, progress=False, prompt_format=MMLUSpec(choice_labels=["A", "B", "C"]))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("doc_to_text", "'{{question}} {{choise}}'", r"doc_to_text[\s\S]*unknown variable\(s\) \['choise'\]"),
        ("doc_to_text", "'{{question'", r"doc_to_text[\s\S]*not a valid Jinja2 template"),
        ("description", "'About {{question}}'", r"description[\s\S]*unknown variable\(s\) \['question'\]"),
        ("choice_labels", "[A, A, B, C]", r"choice_labels[\s\S]*distinct"),
        ("normalize", "length", r"normalize"),
        ("choices", "words", r"choices"),
    ],
)
def test_prompt_fields_are_validated_at_load(tmp_path, field: str, value: str, message: str) -> None:
    from align.evaluation.tasks import TaskSpecError, load_task

    head = "name: m\ntype: mmlu\ndata: {path: x, format: mmlu_csv}\n"
    _write(tmp_path / "t.yaml", head + f"mmlu:\n  {field}: {value}\n")
    with pytest.raises(TaskSpecError, match=message):
        load_task(tmp_path / "t.yaml")


def test_run_task_uses_the_yaml_format(tmp_path, tok, model) -> None:
    from align.evaluation.runner import run_task
    from align.evaluation.tasks import load_task

    _write(tmp_path / "mmlu/test/astro_test.csv", CSV_TEST)
    _write(tmp_path / "mmlu/dev/astro_dev.csv", CSV_DEV)
    _write(
        tmp_path / "cloze.yaml",
        "name: c\ntype: mmlu\ndata: {path: mmlu, format: mmlu_csv}\n"
        "mmlu: {num_fewshot: 1, doc_to_text: 'Question: {{question}}\\nAnswer:', choices: texts, normalize: bytes}\n",
    )
    spec = load_task(tmp_path / "cloze.yaml")
    res = run_task(spec, model, tok, root=tmp_path, progress=False)
    data = load_mmlu(tmp_path / "mmlu")
    direct = evaluate_mmlu(model, tok, data, num_fewshot=1, progress=False, prompt_format=spec.mmlu)
    assert res["normalize"] == "bytes" and res["n"] == 2
    assert res["score"] == pytest.approx(100 * direct.aggregate.accuracy)
