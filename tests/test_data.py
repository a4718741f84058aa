"""Format detection and conversion to TRL's SFT formats, mixtures (no models)."""

from __future__ import annotations

import datasets
import pytest

from align.data import detect_format, mix, to_sft

MSGS = [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "content": "a2"},
]


@pytest.mark.parametrize(
    "cols,fmt",
    [
        ({"messages"}, "messages"),
        ({"prompt", "completion"}, "prompt_completion"),
        ({"instruction", "input", "output"}, "alpaca"),
        ({"text"}, "text"),
        ({"prompt", "chosen", "rejected"}, "preference"),
        ({"chosen", "rejected"}, "hh_rlhf"),
        ({"question", "answer"}, None),
    ],
)
def test_detect_format(cols, fmt):
    assert detect_format(cols) == fmt


def test_messages_completion_loss_trains_on_last_assistant_turn():
    ds = to_sft(
        datasets.Dataset.from_list([{"messages": MSGS}]), "messages", chat=True, loss_on="completion", eos="</s>"
    )
    assert ds[0]["prompt"] == MSGS[:4] and ds[0]["completion"] == MSGS[4:]
    ds = to_sft(datasets.Dataset.from_list([{"messages": MSGS}]), "messages", chat=True, loss_on="all", eos="</s>")
    assert ds[0]["messages"] == MSGS


def test_alpaca_chat_and_plain():
    row = {"instruction": "Add.", "input": "1 and 2", "output": "3"}
    chat = to_sft(datasets.Dataset.from_list([row]), "alpaca", chat=True, loss_on="completion", eos="</s>")[0]
    assert chat["prompt"] == [{"role": "user", "content": "Add.\n\n1 and 2"}]
    assert chat["completion"] == [{"role": "assistant", "content": "3"}]
    plain = to_sft(datasets.Dataset.from_list([row]), "alpaca", chat=False, loss_on="completion", eos="</s>")[0]
    assert plain["prompt"] == "### Instruction:\nAdd.\n\n### Input:\n1 and 2\n\n### Response:\n"
    assert plain["completion"] == "3</s>"
    whole = to_sft(datasets.Dataset.from_list([row]), "alpaca", chat=False, loss_on="all", eos="</s>")[0]
    assert whole["text"] == plain["prompt"] + "3</s>"


def test_mixture_weights_take_rows_in_proportion():
    a = datasets.Dataset.from_list([{"text": f"a{i}"} for i in range(10)])
    b = datasets.Dataset.from_list([{"text": f"b{i}"} for i in range(4)])
    out = mix([(a, 0.5), (b, 2.0)], seed=0)
    texts = out["text"]
    assert sum(t.startswith("a") for t in texts) == 5 and sum(t.startswith("b") for t in texts) == 8
    assert texts != sorted(texts)  # shuffled


def test_large_file_hashes_are_remembered_on_disk_but_not_for_racy_files(tmp_path, monkeypatch):
    """A re-plan does not re-read a big unchanged file; a file changed just now is always read again."""
    import os
    import time

    from align.data import MEMO_MIN_BYTES, file_hash

    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"a" * MEMO_MIN_BYTES)
    old = time.time() - 3600
    os.utime(big, (old, old))
    first = file_hash(big, {})
    assert list((tmp_path / "cache").rglob("filehash/*.json"))
    big.write_bytes(b"b" * MEMO_MIN_BYTES)  # same size, and the same (old) mtime put back: the memo answers
    os.utime(big, (old, old))
    assert file_hash(big, {}) == first
    big.write_bytes(b"c" * MEMO_MIN_BYTES)  # changed now (mtime after the memo): read again
    assert file_hash(big, {}) != first
    racy = tmp_path / "racy.jsonl"
    racy.write_bytes(b"x" * MEMO_MIN_BYTES)
    h1 = file_hash(racy, {})
    st = racy.stat()
    racy.write_bytes(b"y" * MEMO_MIN_BYTES)  # same size, same mtime as when the memo was written
    os.utime(racy, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_hash(racy, {}) != h1  # written within the racy window: never trusted
