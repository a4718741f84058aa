"""BLEU/ROUGE parity: ``align.evaluation.generation`` vs sacrebleu (API and CLI) and rouge-score.

Uses the real WMT22 de-en slice (two references per segment) and the DialogSum slice from
``../shared/data``, with simple deterministic "system outputs" so no model is needed:
``drop_words`` (reference A with every 3rd word removed) and ``copy_source`` (the German
source / the dialogue copied). Prints JSON; exits non-zero if any difference exceeds 0.01.

    PYTHONPATH=src .venv/bin/python benchmarks/genmetrics_parity.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "../shared/data"
TOL = 0.01


def _drop_words(text: str) -> str:
    words = text.split()
    return " ".join(w for i, w in enumerate(words) if i % 3 != 2)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _sacrebleu_cli(hyps: list[str], ref_streams: list[list[str]]) -> float:
    """``sacrebleu REF... -i HYP -b -w 4`` with the CLI next to this interpreter."""
    exe = Path(sys.executable).with_name("sacrebleu")
    with tempfile.TemporaryDirectory() as tmp:
        hyp_file = Path(tmp) / "hyp.txt"
        hyp_file.write_text("\n".join(hyps) + "\n", encoding="utf-8")
        ref_files = []
        for k, stream in enumerate(ref_streams):
            f = Path(tmp) / f"ref{k}.txt"
            f.write_text("\n".join(stream) + "\n", encoding="utf-8")
            ref_files.append(str(f))
        out = subprocess.run(
            [str(exe), *ref_files, "-i", str(hyp_file), "-b", "-w", "4"],
            check=True,
            capture_output=True,
            text=True,
        )
    return float(out.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DATA))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import sacrebleu
    from rouge_score.rouge_scorer import RougeScorer

    from align.evaluation.generation import ROUGE_TYPES, bleu, rouge

    data = Path(args.data)
    wmt = _read_jsonl(data / "mt/wmt22_de-en_200.jsonl")
    ref_a = [r["references"]["A"] for r in wmt]
    ref_b = [r["references"]["B"] for r in wmt]
    systems = {
        "drop_words": [_drop_words(r) for r in ref_a],
        "copy_source": [r["source"] for r in wmt],
        "reference_A": ref_a,
    }
    report: dict = {"wmt22_de_en": {}, "dialogsum": {}, "tolerance": TOL}
    worst = 0.0
    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    for name, hyps in systems.items():
        two_refs = [[a, b] for a, b in zip(ref_a, ref_b, strict=True)]
        row = {
            "bleu_align_AB": bleu(hyps, two_refs)["score"],
            "bleu_sacrebleu_api_AB": sacrebleu.corpus_bleu(hyps, [ref_a, ref_b]).score,
            "bleu_sacrebleu_cli_AB": _sacrebleu_cli(hyps, [ref_a, ref_b]),
            "bleu_align_A": bleu(hyps, ref_a)["score"],
            "bleu_sacrebleu_api_A": sacrebleu.corpus_bleu(hyps, [ref_a]).score,
        }
        worst = max(
            worst,
            abs(row["bleu_align_AB"] - row["bleu_sacrebleu_api_AB"]),
            abs(row["bleu_align_AB"] - row["bleu_sacrebleu_cli_AB"]),
            abs(row["bleu_align_A"] - row["bleu_sacrebleu_api_A"]),
        )
        ours = rouge(hyps, ref_a)
        for t in ROUGE_TYPES:
            direct = 100 * sum(scorer.score(r, h)[t].fmeasure for h, r in zip(hyps, ref_a, strict=True))
            direct /= len(hyps)
            row[f"{t}_align"], row[f"{t}_rouge_score"] = ours[t], direct
            worst = max(worst, abs(ours[t] - direct))
        report["wmt22_de_en"][name] = row

    summ = _read_jsonl(data / "summ/dialogsum_dev_200.jsonl")
    refs = [r["references"][0] for r in summ]
    for name, hyps in {
        "drop_words": [_drop_words(r) for r in refs],
        "copy_document": [r["document"] for r in summ],
    }.items():
        ours = rouge(hyps, [r["references"] for r in summ])
        row = {}
        for t in ROUGE_TYPES:
            direct = 100 * sum(
                scorer.score_multi(r["references"], h)[t].fmeasure for h, r in zip(hyps, summ, strict=True)
            )
            direct /= len(hyps)
            row[f"{t}_align"], row[f"{t}_rouge_score"] = ours[t], direct
            worst = max(worst, abs(ours[t] - direct))
        report["dialogsum"][name] = row

    report["max_abs_diff"] = worst
    report["ok"] = worst <= TOL
    print(json.dumps(report, indent=2))
    if not report["ok"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
