"""chrF/chrF++, BLEU options, ROUGE in every script, and `align score` (saved outputs, no model).

Values are checked against sacrebleu and rouge-score called directly; tiny inline data runs
everywhere, the WMT22 / DialogSum slices in ../shared/data are used when present.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import sacrebleu
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU, CHRF

from align.errors import RecipeError
from align.evaluation import score
from align.evaluation.generation import (
    ROUGE_TYPES,
    CJKTokenizer,
    UnicodeTokenizer,
    bleu,
    chrf,
    rouge,
    split_sentences,
)
from align.evaluation.tasks import TaskSpec, TaskSpecError, load_task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "../shared/data"
PARITY = ROOT / "benchmarks/results/genmetrics_parity.json"

HYPS = ["The goods cost under 20 euros.", "The fee is 40% of the goods.", "Hello there!"]
REFS_A = ["The goods cost less than 20 euros.", "The fee equals 40% of the value.", "Hi there!"]
REFS_B = ["The merchandise was less than 20 EURO.", "The fee is 40 % of the goods' value."]
ITEMS = [[REFS_A[0], REFS_B[0]], [REFS_A[1], REFS_B[1]], [REFS_A[2]]]  # the last item has one reference

# identical text must score 100 whatever the script; rouge-score's own tokenizer keeps ASCII only
SAME_TEXT = {
    "de": ("Die Größe der Grüße überrascht Jürgen. Straße!", "unicode"),
    "fr": ("L'élève naïf a mangé une crème brûlée à Noël.", "unicode"),
    "ru": ("Съешь же ещё этих мягких французских булок. Да выпей чаю!", "unicode"),
    "zh": ("我喜欢机器学习。今天天气很好！", "cjk"),
    "ja": ("東京タワーは333メートルです。とても高いですね！", "cjk"),
    "ko": ("안녕하세요 세계. 만나서 반갑습니다!", "cjk"),
}


def _spec(metric: object, language: str | None = None, **extra: object) -> TaskSpec:
    raw = {
        "name": "t",
        "type": "generation",
        "data": {"path": "d.jsonl", "format": "jsonl", "input_field": "src", "reference_field": "refs"},
        "prompt": {"template": "{src}"},
        "metric": metric,
        **extra,
    }
    if language is not None:
        raw["language"] = language
    return TaskSpec.model_validate(raw)


def _task_file(tmp_path: Path, yaml_metric: str, refs: list, language: str | None = None) -> Path:
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"src": f"s{i}", "refs": r}) + "\n" for i, r in enumerate(refs)))
    lang = f"language: {language}\n" if language else ""
    task = tmp_path / "toy.yaml"
    task.write_text(
        f"name: toy\ntype: generation\n{lang}data: {{path: {data}, format: jsonl, input_field: src, "
        f"reference_field: refs}}\nprompt: {{template: '{{src}}'}}\nmetric: {yaml_metric}\n"
    )
    return task


# --------------------------------------------------------------------------- chrF, chrF++, BLEU options


def test_chrf_and_chrf_pp_equal_sacrebleu() -> None:
    streams = [REFS_A, [*REFS_B, None]]
    assert chrf(HYPS, ITEMS)["score"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, streams).score, abs=1e-9)
    pp = chrf(HYPS, ITEMS, word_order=2)
    assert pp["score"] == pytest.approx(CHRF(word_order=2).corpus_score(HYPS, streams).score, abs=1e-9)
    assert "nw:2" in pp["signature"]
    low = chrf(HYPS, ITEMS, lowercase=True, whitespace=True)["score"]
    assert low == pytest.approx(CHRF(lowercase=True, whitespace=True).corpus_score(HYPS, streams).score)
    assert chrf(["same text"], ["same text"])["score"] == pytest.approx(100.0)


def test_task_metric_list_scores_bleu_chrf_chrfpp_like_sacrebleu() -> None:
    spec = _spec(
        [
            {"name": "bleu", "tokenize": "intl", "lowercase": True, "smooth_method": "floor", "effective_order": True},
            {"name": "chrf"},
            {"name": "chrf++"},
        ]
    )
    res = score.score_outputs(spec, HYPS, ITEMS)
    streams = [REFS_A, [*REFS_B, None]]
    want_bleu = BLEU(tokenize="intl", lowercase=True, smooth_method="floor", effective_order=True)
    assert res["metric"] == "bleu" and list(res["metrics"]) == ["bleu", "chrf", "chrf++"]
    assert res["score"] == res["metrics"]["bleu"]
    assert res["metrics"]["bleu"] == pytest.approx(want_bleu.corpus_score(HYPS, streams).score, abs=1e-9)
    assert res["metrics"]["chrf"] == pytest.approx(CHRF().corpus_score(HYPS, streams).score, abs=1e-9)
    assert res["metrics"]["chrf++"] == pytest.approx(CHRF(word_order=2).corpus_score(HYPS, streams).score, abs=1e-9)
    assert "tok:intl" in res["details"]["bleu"]["signature"] and "case:lc" in res["details"]["bleu"]["signature"]
    recs = score.generation_records({"task": "t", "version": 3, **res})
    assert [(r["metric"], r["task_version"], r["n"]) for r in recs] == [
        ("bleu", 3, 3),
        ("chrf", 3, 3),
        ("chrf++", 3, 3),
    ]
    assert recs[1]["signature"].startswith("nrefs:var")  # items have 2, 2 and 1 references


def test_bleu_defaults_follow_the_task_language() -> None:
    assert _spec({"name": "bleu"}).metrics[0].tokenize == "13a"
    assert _spec({"name": "bleu"}, language="zh-Hans").metrics[0].tokenize == "zh"
    assert _spec({"name": "bleu", "tokenize": "char"}, language="zh").metrics[0].tokenize == "char"
    # the same choice sacrebleu makes itself when it is told the target language
    assert BLEU(trg_lang="zh").tokenizer.signature() == BLEU(tokenize="zh").tokenizer.signature()


def test_bleu_options_validated_listing_sacrebleus_values(tmp_path) -> None:
    task = _task_file(tmp_path, "{name: bleu, tokenize: 13b}", ["x"])
    with pytest.raises(TaskSpecError, match="tokenize '13b' is not one of sacrebleu's") as e:
        load_task(task)
    assert ", ".join(BLEU.TOKENIZERS) in str(e.value) and "did you mean `13a`" in str(e.value)
    task = _task_file(tmp_path, "{name: bleu, smooth_method: expo}", ["x"])
    with pytest.raises(TaskSpecError, match="smooth_method 'expo'") as e:
        load_task(task)
    assert ", ".join(BLEU.SMOOTH_DEFAULTS) in str(e.value)
    for bad, field in [("lowercase: maybe", "lowercase"), ("effective_order: 3", "effective_order")]:
        with pytest.raises(TaskSpecError, match=field):
            load_task(_task_file(tmp_path, f"{{name: bleu, {bad}}}", ["x"]))
    with pytest.raises(TaskSpecError, match=r"metric\.1\.chrf\+\+\.word_order"):  # chrf++ *is* word_order 2
        load_task(_task_file(tmp_path, "[{name: bleu}, {name: chrf++, word_order: 2}]", ["x"]))
    with pytest.raises(TaskSpecError, match="listed once"):
        load_task(_task_file(tmp_path, "[{name: chrf}, {name: chrf}]", ["x"]))
    with pytest.raises(TaskSpecError, match="list is empty"):
        load_task(_task_file(tmp_path, "[]", ["x"]))
    with pytest.raises(TaskSpecError, match="metric.name must be one of"):
        load_task(_task_file(tmp_path, "[{name: bleu}, {name: accuracy}]", ["x"]))


def test_empty_and_none_inputs_fail_naming_the_item() -> None:
    for fn in (bleu, chrf, rouge):
        with pytest.raises(ValueError, match="no hypotheses"):
            fn([], [])
        with pytest.raises(ValueError, match="item 1: reference is None"):
            fn(["a", "b"], ["a", None])
        with pytest.raises(ValueError, match="item 0: reference 1 must be a string, got None"):
            fn(["a"], [["a", None]])
        with pytest.raises(ValueError, match="item 0: hypothesis must be a string, got None"):
            fn([None], ["a"])
        with pytest.raises(ValueError, match="item 0: no references"):
            fn(["a"], [[]])
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        chrf(["a", "b"], ["a"])


def test_null_reference_in_task_data_names_the_line(tmp_path) -> None:
    from align.evaluation.tasks import load_generation_items

    spec = load_task(_task_file(tmp_path, "{name: bleu}", ["fine", None]))
    with pytest.raises(ValueError, match=r"items\.jsonl:2: reference must be .*got null"):
        load_generation_items(spec)


# --------------------------------------------------------------------------- ROUGE in every language


def test_english_default_is_rouge_score_with_stemming() -> None:
    for spec in (_spec({"name": "rouge"}), _spec({"name": "rouge"}, language="en-GB")):
        m = spec.metrics[0]
        assert (m.tokenizer, m.use_stemmer, m.sentence_split) == ("rouge_score", True, "newline")
    hyps = ["The cats were running home.\nThey ate.", "A quick brown fox"]
    refs = [["The cat runs home.\nIt eats."], ["the quick brown foxes jumped", "a fox"]]
    res = score.score_outputs(_spec({"name": "rouge"}, language="en"), hyps, refs)
    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    for t in ROUGE_TYPES:
        direct = [scorer.score_multi(r, h)[t].fmeasure * 100 for h, r in zip(hyps, refs, strict=True)]
        assert res[t] == sum(direct) / 2  # exactly: the same library call
    assert res["score"] == res["rougeL"]


@pytest.mark.skipif(not (DATA / "summ/dialogsum_dev_200.jsonl").is_file(), reason="shared data absent")
def test_dialogsum_task_numbers_do_not_move() -> None:
    """The shipped DialogSum task through score_outputs reproduces benchmarks/results/genmetrics_parity.json."""
    spec = load_task("dialogsum", tasks_dir=ROOT / "evaluation/tasks")
    rows = [json.loads(line) for line in (DATA / "summ/dialogsum_dev_200.jsonl").read_text().splitlines() if line]
    words = [r["references"][0].split() for r in rows]
    hyps = [" ".join(w for i, w in enumerate(ws) if i % 3 != 2) for ws in words]  # the benchmark's drop_words
    res = score.score_outputs(spec, hyps, [r["references"] for r in rows])
    want = json.loads(PARITY.read_text())["dialogsum"]["drop_words"]
    for t in ROUGE_TYPES:
        assert res[t] == want[f"{t}_align"]


def test_language_picks_the_rouge_tokenizer(tmp_path) -> None:
    cases = {None: "rouge_score", "en": "rouge_score", "de": "unicode", "ru": "unicode", "pt-BR": "unicode"}
    cases |= {"zh": "cjk", "zh-Hant": "cjk", "ja": "cjk", "ko": "cjk"}
    for lang, tok in cases.items():
        m = _spec({"name": "rouge"}, language=lang).metrics[0]
        assert (m.tokenizer, m.use_stemmer) == (tok, tok == "rouge_score"), lang
    assert _spec({"name": "rouge", "tokenizer": "unicode"}, language="en").metrics[0].use_stemmer is False
    with pytest.raises(TaskSpecError, match="use_stemmer is English-only"):
        load_task(_task_file(tmp_path, "{name: rouge, use_stemmer: true}", ["x"], language="de"))
    with pytest.raises(TaskSpecError, match="English-only"):
        load_task(_task_file(tmp_path, "{name: rouge, tokenizer: cjk, use_stemmer: true}", ["x"]))
    with pytest.raises(TaskSpecError, match="tokenizer"):
        load_task(_task_file(tmp_path, "{name: rouge, tokenizer: nltk}", ["x"]))
    with pytest.raises(TaskSpecError, match="sentence_split"):
        load_task(_task_file(tmp_path, "{name: rouge, sentence_split: nltk}", ["x"]))
    with pytest.raises(TaskSpecError, match="not a BCP-47 code"):
        load_task(_task_file(tmp_path, "{name: rouge}", ["x"], language="German"))


def test_unicode_tokenizer_keeps_words_whole() -> None:
    tok = UnicodeTokenizer()
    assert tok.tokenize("Die Größe, nicht die GRÜSSE!") == ["die", "größe", "nicht", "die", "grüsse"]
    assert tok.tokenize("Größe") != tok.tokenize("Grüße")
    assert tok.tokenize(unicodedata.normalize("NFD", "Größe café")) == ["größe", "café"]  # decomposed = composed
    assert tok.tokenize("Привет, мир: 2024-й год.") == ["привет", "мир", "2024", "й", "год"]
    assert tok.tokenize("नमस्ते दुनिया") == ["नमस्ते", "दुनिया"]  # vowel signs (combining marks) stay in the word
    # rouge-score's own tokenizer cuts these words apart and drops Cyrillic entirely
    assert RougeScorer(["rouge1"])._tokenizer.tokenize("Größe Привет") == ["gr", "e"]
    r = rouge(["die Größe"], ["die Grüße"], tokenizer="unicode")
    assert r["rouge1"] == pytest.approx(50.0)  # "die" matches, Größe != Grüße
    assert rouge(["die Größe"], ["die Grüße"])["rouge1"] == pytest.approx(100.0)  # rouge-score: "die gr e" twice


def test_cjk_tokenizer_characters_and_whole_foreign_words() -> None:
    tok = CJKTokenizer()
    assert tok.tokenize("我喜欢Python 3和机器学习。") == ["我", "喜", "欢", "python", "3", "和", "机", "器", "学", "习"]
    assert tok.tokenize("東京タワーは333メートル") == [
        "東",
        "京",
        "タ",
        "ワ",
        "ー",
        "は",
        "333",
        "メ",
        "ー",
        "ト",
        "ル",
    ]
    assert tok.tokenize("안녕 세계") == ["안", "녕", "세", "계"]
    assert tok.tokenize("ＡＢＣ１２３") == ["abc123"]  # full-width forms (NFKC)
    r = rouge(["我喜欢机器学习"], ["我喜欢深度学习"], rouge_types=["rouge1"], tokenizer="cjk")
    assert r["rouge1"] == pytest.approx(100 * 5 / 7)


@pytest.mark.parametrize("lang", sorted(SAME_TEXT))
def test_identical_text_scores_100_in_every_script(lang: str) -> None:
    text, tok = SAME_TEXT[lang]
    spec = _spec({"name": "rouge", "sentence_split": "punctuation"}, language=lang)
    assert spec.metrics[0].tokenizer == tok
    res = score.score_outputs(spec, [text, text.upper()], [text, [text.upper(), "x"]])
    for t in ROUGE_TYPES:
        assert res[t] == pytest.approx(100.0), t
    assert chrf([text], [text])["score"] == pytest.approx(100.0)
    assert bleu([text], [text], tokenize="char" if tok == "cjk" else "13a")["score"] == pytest.approx(100.0)
    if not any(c.isascii() and c.isalnum() for c in text):  # what the language default fixes:
        assert rouge([text], [text])["rouge1"] == 0.0  # rouge-score's own tokenizer sees no tokens at all


def test_rouge_lsum_sentence_split() -> None:
    hyp = "The cat sat. It was happy! Then it slept."
    ref = "Then it slept. The cat sat on a mat. It was happy!"
    assert split_sentences(ref, "punctuation") == "Then it slept.\nThe cat sat on a mat.\nIt was happy!"
    assert split_sentences('He said "stop." Then 3.5 km ran.', "punctuation") == 'He said "stop."\nThen 3.5 km ran.'
    assert split_sentences("今天很好。我们走吧！好", "punctuation") == "今天很好。\n我们走吧！\n好"
    assert split_sentences(ref, "newline") == ref
    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    lines = [s.replace(". ", ".\n").replace("! ", "!\n") for s in (hyp, ref)]
    split = rouge([hyp], [ref], sentence_split="punctuation")
    plain = rouge([hyp], [ref])
    direct = scorer.score(lines[1], lines[0])
    assert split["rougeLsum"] == pytest.approx(direct["rougeLsum"].fmeasure * 100)
    assert split["rougeLsum"] > plain["rougeLsum"] == pytest.approx(plain["rougeL"])  # one line = plain LCS
    for t in ("rouge1", "rouge2", "rougeL"):  # only rougeLsum sees the sentences
        assert split[t] == plain[t]
    with pytest.raises(ValueError, match="sentence_split"):
        split_sentences("a", "nltk")


@pytest.mark.skipif(not (DATA / "mt/wmt22_de-en_200.jsonl").is_file(), reason="shared data absent")
def test_wmt22_slice_bleu_and_chrf_equal_sacrebleu() -> None:
    rows = [json.loads(line) for line in (DATA / "mt/wmt22_de-en_200.jsonl").read_text().splitlines() if line][:60]
    a, b = [r["references"]["A"] for r in rows], [r["references"]["B"] for r in rows]
    hyps = [" ".join(w for i, w in enumerate(x.split()) if i % 3 != 2) for x in a]
    res = score.score_outputs(
        _spec([{"name": "bleu"}, {"name": "chrf"}, {"name": "chrf++"}]), hyps, list(zip(a, b, strict=True))
    )
    assert res["metrics"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [a, b]).score, abs=1e-9)
    assert res["metrics"]["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [a, b]).score, abs=1e-9)
    pp = sacrebleu.corpus_chrf(hyps, [a, b], word_order=2).score
    assert res["metrics"]["chrf++"] == pytest.approx(pp, abs=1e-9)


# --------------------------------------------------------------------------- align score


def _run_score(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="align")
    score.add_parser(parser.add_subparsers(dest="command"))
    return score.main(parser.parse_args(["score", *argv]))


def _write_jsonl(path: Path, preds: list) -> Path:
    path.write_text("".join(json.dumps({"id": i, "prediction": p}) + "\n" for i, p in enumerate(preds)))
    return path


def test_align_score_writes_eval_metrics(tmp_path, capsys) -> None:
    from align.evaluation.compare import load_metrics
    from align.evaluation.score import summary_table

    task = _task_file(tmp_path, "[{name: chrf}, {name: bleu}, {name: rouge}]", ITEMS)
    preds = _write_jsonl(tmp_path / "sys.jsonl", HYPS)
    assert _run_score(str(task), "--predictions", str(preds), "--out", str(tmp_path / "out")) == 0
    data = load_metrics(tmp_path / "out")
    keys = [(r["target"], r["task"], r["metric"]) for r in data["results"]]
    assert keys == [("sys", "toy", m) for m in ("chrf", "bleu", "rouge1", "rouge2", "rougeL", "rougeLsum")]
    by = {r["metric"]: r["value"] for r in data["results"]}
    streams = [REFS_A, [*REFS_B, None]]
    assert by["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, streams).score, abs=1e-9)
    assert by["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, streams).score, abs=1e-9)
    assert all(r["n"] == 3 and r["task_version"] == 1 and r["higher_is_better"] for r in data["results"])
    table = (tmp_path / "out/summary.md").read_text()
    assert table == summary_table(data["results"])
    assert table in capsys.readouterr().out
    # .txt: one output per line, same numbers; --label names the column
    txt = tmp_path / "sys.txt"
    txt.write_text("\n".join(HYPS) + "\n")
    assert _run_score(str(task), "--predictions", str(txt), "--out", str(tmp_path / "o2"), "--label", "mine") == 0
    again = load_metrics(tmp_path / "o2")["results"]
    assert [(r["target"], r["value"]) for r in again] == [("mine", r["value"]) for r in data["results"]]
    # --limit: the first N items
    _write_jsonl(tmp_path / "two.jsonl", HYPS[:2])
    assert (
        _run_score(
            str(task), "--predictions", str(tmp_path / "two.jsonl"), "--out", str(tmp_path / "o3"), "--limit", "2"
        )
        == 0
    )
    assert load_metrics(tmp_path / "o3")["results"][0]["n"] == 2


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        (None, ".jsonl", "no such file"),
        ("", ".jsonl", "is empty: no predictions"),
        ("\n  \n", ".txt", "is empty"),
        ('{"prediction": "a"}\n{"prediction": "b"}\n', ".jsonl", "has 2 predictions but task `toy` has 3 items"),
        ("a\nb\nc\nd\n", ".txt", "has 4 predictions but task `toy` has 3 items"),
        (
            '{"prediction": "a"}\n{"output": "b"}\n{"prediction": "c"}\n',
            ".jsonl",
            r":2: no `prediction` field \(has: output\)",
        ),
        ('{"prediction": "a"}\n{"prediction": "b",}\n', ".jsonl", ":2: not valid JSON"),
        ('{"prediction": "a"}\n["b"]\n', ".jsonl", ":2: expected a JSON object"),
        ('{"prediction": null}\n', ".jsonl", ":1: `prediction` must be a string, got null"),
        ('{"target": "base", "task": "toy", "predictions": ["a"]}\n', ".jsonl", "eval stage's predictions.jsonl"),
        ("a,b\n", ".csv", "expected .jsonl"),
    ],
)
def test_align_score_bad_predictions(tmp_path, content, suffix, message) -> None:
    task = _task_file(tmp_path, "{name: bleu}", ITEMS)
    preds = tmp_path / f"p{suffix}"
    if content is not None:
        preds.write_text(content)
    with pytest.raises(RecipeError, match=message) as e:
        _run_score(str(task), "--predictions", str(preds), "--out", str(tmp_path / "out"))
    assert e.value.exit_code == 2
    assert not (tmp_path / "out").exists()  # nothing written on bad input


def test_align_score_bad_task(tmp_path) -> None:
    preds = _write_jsonl(tmp_path / "p.jsonl", ["a"])
    with pytest.raises(RecipeError, match="no task named 'no_such_task'"):
        _run_score("no_such_task", "--predictions", str(preds))
    with pytest.raises(RecipeError) as e:  # both problems at once
        _run_score("no_such_task", "--predictions", str(tmp_path / "missing.jsonl"))
    assert len(e.value.problems) == 2
    with pytest.raises(RecipeError, match="is a mmlu task"):
        _run_score("mmlu_shared5", "--predictions", str(preds))
    with pytest.raises(RecipeError, match="tokenize '13b'"):
        _run_score(str(_task_file(tmp_path, "{name: bleu, tokenize: 13b}", ["x"])), "--predictions", str(preds))
    with pytest.raises(RecipeError, match="at least 1"):
        _run_score(str(_task_file(tmp_path, "{name: bleu}", ["x"])), "--predictions", str(preds), "--limit", "0")
    task = _task_file(tmp_path, "{name: bleu}", ["x"])
    (tmp_path / "items.jsonl").unlink()
    with pytest.raises(RecipeError, match="data file not found"):
        _run_score(str(task), "--predictions", str(preds))


def test_align_score_command_line(tmp_path) -> None:
    """End to end through `python -m align score` (needs score wired into cli.py)."""
    task = _task_file(tmp_path, "[{name: bleu}, {name: chrf++}]", ITEMS)
    preds = _write_jsonl(tmp_path / "sys.jsonl", HYPS)
    cmd = [sys.executable, "-m", "align", "score", str(task), "--predictions"]
    ok = subprocess.run([*cmd, str(preds), "--out", "out"], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "| toy/bleu |" in ok.stdout and "| toy/chrf++ |" in ok.stdout
    results = json.loads((tmp_path / "out/metrics.json").read_text())["results"]
    assert [r["metric"] for r in results] == ["bleu", "chrf++"]
    preds.write_text('{"prediction": "a"}\n{"prediction": "b"\n')
    bad = subprocess.run([*cmd, str(preds)], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "sys.jsonl:2: not valid JSON" in bad.stderr and "Traceback" not in bad.stderr
