"""Text sources, their calib/eval splits, the R data parser behind the Austen corpus, and token windows."""

from __future__ import annotations

import itertools
import json
import os
import struct
import zlib
from pathlib import Path

import pytest
import torch

from kvcompile.data import CORPORA, check_source, load_documents, load_text, parse_rdata_rdb, token_windows
from kvcompile.errors import KVCompileError
from tests.tiny import WORDS, calib_text, tiny_tokenizer

# The real cache (for the slow tests on real corpora), as the environment had it before the fixture below.
REAL_HOME = os.environ.get("KVCOMPILE_HOME")


def _use_real_home(monkeypatch: pytest.MonkeyPatch) -> None:
    if REAL_HOME is None:
        monkeypatch.delenv("KVCOMPILE_HOME")
    else:
        monkeypatch.setenv("KVCOMPILE_HOME", REAL_HOME)


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own KVCOMPILE_HOME (token and datasets caches), except the slow corpus tests below."""
    path = tmp_path / "home"
    monkeypatch.setenv("KVCOMPILE_HOME", str(path))
    return path


def _r_strings(values: list[str | None], version: int = 3, latin1: bool = False) -> bytes:
    """R's XDR serialization of a character vector, as `serialize(x, NULL, xdr = TRUE)` writes it."""
    out = b"X\n" + struct.pack(">iii", version, 0x040201, 0x030500)
    if version == 3:
        out += struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(values))
    for value in values:
        if value is None:
            out += struct.pack(">ii", 9, -1)
            continue
        level = (1 << 2) if latin1 else (1 << 3)
        raw = value.encode("latin-1" if latin1 else "utf-8")
        out += struct.pack(">ii", 9 | (level << 12), len(raw)) + raw
    return out


def _rdb(*objects: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(obj)) + zlib.compress(obj) for obj in objects)


def test_parse_rdata_rdb_reads_each_block() -> None:
    data = _rdb(
        _r_strings(["PERSUASION", "", "Chapter 1", "naïve café", None]),
        _r_strings(["EMMA", "Émile"], version=2, latin1=True),
    )
    assert parse_rdata_rdb(data) == [["PERSUASION", "", "Chapter 1", "naïve café", None], ["EMMA", "Émile"]]


def test_parse_rdata_rdb_rejects_damage() -> None:
    good = _rdb(_r_strings(["a", "b"]))
    with pytest.raises(KVCompileError, match=r"incomplete|corrupt|truncated"):
        parse_rdata_rdb(good[:-5])
    not_strings = b"X\n" + struct.pack(">iii", 2, 0, 0) + struct.pack(">ii", 13, 1) + struct.pack(">i", 7)
    with pytest.raises(KVCompileError, match="SEXP type 13"):
        parse_rdata_rdb(_rdb(not_strings))


def test_single_text_file_splits_at_a_line_near_80_percent(tmp_path: Path) -> None:
    lines = [f"line {i} " + " ".join(WORDS[i % len(WORDS):][:8]) for i in range(200)]
    path = tmp_path / "book.txt"
    path.write_text("\n".join(lines) + "\n")
    calib, evaluation = load_text(str(path), "calib"), load_text(str(path), "eval")
    assert load_text(str(path), "calib") == calib  # deterministic
    assert calib.splitlines()[0] == "line 0 " + " ".join(WORDS[:8])
    calib_lines, eval_lines = set(calib.splitlines()), set(evaluation.splitlines())
    assert not calib_lines & eval_lines
    assert calib_lines | eval_lines == set(lines)
    assert 0.75 < len(calib) / (len(calib) + len(evaluation)) < 0.85
    assert load_text(str(path)) == "\n".join(lines)


def test_jsonl_documents_split_80_20(tmp_path: Path) -> None:
    docs = [f"document {i}: " + " ".join(WORDS[i:i + 20]) for i in range(10)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": doc}) + "\n" for i, doc in enumerate(docs)))
    assert load_documents(str(path), "calib") == docs[:8]
    assert load_documents(str(path), "eval") == docs[8:]
    assert load_documents(str(path)) == docs
    assert load_text(str(path), "eval") == docs[8] + "\n\n" + docs[9]


def test_only_string_column_is_the_text(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"n": i, "body": f"row {i}"}) + "\n" for i in range(5)))
    assert load_documents(str(path)) == [f"row {i}" for i in range(5)]
    ambiguous = tmp_path / "two.jsonl"
    ambiguous.write_text(json.dumps({"a": "x", "b": "y"}) + "\n")
    with pytest.raises(KVCompileError, match="no 'text' column"):
        load_documents(str(ambiguous))


def test_folder_of_text_files_is_one_document_per_file(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i:02d}.txt").write_text(f"file {i}\nsecond line of {i}\n")
    docs = load_documents(str(folder))
    assert [doc.splitlines()[0] for doc in docs] == [f"file {i}" for i in range(5)]
    assert [doc.splitlines()[0] for doc in load_documents(str(folder), "eval")] == ["file 4"]


def test_bad_sources_are_one_line_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n   \n")
    cases = [
        (lambda: load_text(str(empty)), "empty"),
        (lambda: load_text(str(blank)), "empty"),
        (lambda: load_text("no-such-corpus"), "not a file or folder, an offline corpus"),
        (lambda: load_text(str(tmp_path / "missing.txt")), "not a file or folder"),
        (lambda: load_text("austen", "test"), "unknown split"),
        (lambda: load_text("hf:someone/missing-dataset"), "unreachable or unknown"),
    ]
    for call, expected in cases:
        with pytest.raises(KVCompileError, match=expected) as info:
            call()
        assert "\n" not in str(info.value)


def test_check_source_does_not_fetch(home: Path, tmp_path: Path) -> None:
    assert check_source("austen") == "corpus"
    assert check_source("hf:wikitext:wikitext-2-raw-v1") == "hub"
    assert check_source(str(tmp_path)) == "local"
    assert not home.exists()


def _text_file(tmp_path: Path, n_words: int) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(calib_text(n_words) + "\n")
    return path


def test_token_windows_are_deterministic_non_overlapping_slices(tmp_path: Path, home: Path) -> None:
    tokenizer = tiny_tokenizer()
    path = _text_file(tmp_path, 6000)
    ids = tokenizer(load_text(str(path)), add_special_tokens=False)["input_ids"]
    windows = token_windows(str(path), tokenizer, split=None, n_windows=5, seq_len=256, seed=3)
    assert windows.dtype == torch.long
    assert windows.shape == (5, 256)
    assert torch.equal(windows, token_windows(str(path), tokenizer, split=None, n_windows=5, seq_len=256, seed=3))
    assert not torch.equal(windows, token_windows(str(path), tokenizer, split=None, n_windows=5, seq_len=256,
                                                  seed=4))
    assert list((home / "tokens").glob("*.safetensors"))  # tokenized once, cached

    starts = []
    for row in windows.tolist():
        matches = [s for s in range(len(ids) - 255) if ids[s:s + 256] == row]
        assert matches, "a window is not a slice of the tokenized text"
        starts.append(matches[0])
    assert starts == sorted(starts)
    assert all(b - a >= 256 for a, b in itertools.pairwise(starts))


def test_token_windows_use_what_fits_with_a_warning(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    path = _text_file(tmp_path, 700)
    with pytest.warns(UserWarning, match="room for 2 windows"):
        windows = token_windows(str(path), tokenizer, split=None, n_windows=10, seq_len=300)
    assert windows.shape == (2, 300)


def test_token_windows_errors(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    path = _text_file(tmp_path, 100)
    with pytest.raises(KVCompileError, match="fewer than one window") as info:
        token_windows(str(path), tokenizer, split=None, n_windows=1, seq_len=1000)
    assert "\n" not in str(info.value)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(KVCompileError, match="empty"):
        token_windows(str(empty), tokenizer, split=None, n_windows=1, seq_len=8)
    with pytest.raises(KVCompileError, match="at least one window"):
        token_windows(str(path), tokenizer, split=None, n_windows=0, seq_len=8)


def _assert_disjoint(calib: str, evaluation: str) -> None:
    # Long spans of eval text (away from boilerplate) never occur in the calib text.
    step = max(1, len(evaluation) // 25)
    for start in range(step, len(evaluation) - 300, step):
        assert evaluation[start:start + 300] not in calib


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CORPORA))
def test_offline_corpus_splits_are_disjoint_and_deterministic(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _use_real_home(monkeypatch)  # fetched once per machine
    calib, evaluation = load_text(name, "calib"), load_text(name, "eval")
    assert load_text(name, "calib") == calib
    assert len(calib) > 3 * len(evaluation) > 1_000_000
    _assert_disjoint(calib, evaluation)
    if name == "austen":
        assert evaluation.startswith("Persuasion")
        assert all(title in calib for title in ("EMMA", "PRIDE AND PREJUDICE", "SENSE AND SENSIBILITY"))
        assert len(load_documents(name)) == 6
    else:
        assert evaluation.startswith("HAMLET, PRINCE OF DENMARK")
        assert "Shakespeare, William (1564--1616)" in calib  # the Britannica article calibrates


@pytest.mark.slow
def test_austen_windows_with_a_real_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvcompile.models import load_model

    _use_real_home(monkeypatch)
    _, tokenizer = load_model("smollm2-135m")
    a = token_windows("austen", tokenizer, split="calib", n_windows=32, seq_len=1024, seed=0)
    b = token_windows("austen", tokenizer, split="eval", n_windows=32, seq_len=1024, seed=0)
    assert a.shape == b.shape == (32, 1024)
    evaluation = load_text("austen", "eval")
    assert tokenizer.decode(b[0, 1:-1].tolist()) in evaluation  # eval windows come from Persuasion...
    assert tokenizer.decode(a[0, 1:-1].tolist()) not in evaluation  # ...and calib windows do not
