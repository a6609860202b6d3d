"""`prepare`: text -> tokenizer.json + train.bin/val.bin (raw token arrays) + meta.json."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.config import DataConfig
from gptlab.data.sources import checksum, read_text, source_files
from gptlab.errors import GptlabError
from gptlab.progress import progress_bar
from gptlab.tokenizers import Tokenizer

FORMAT_VERSION = 1
CHUNK_CHARS = 1 << 20  # encode about a megabyte at a time so the bar moves


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to a temporary name, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


@dataclass
class PrepareResult:
    """What `prepare` did: where, how many tokens, and whether it skipped up-to-date data."""

    dir: Path
    meta: dict[str, Any]
    skipped: bool


def _chunks(text: str) -> list[str]:
    """Split text into ~CHUNK_CHARS pieces at newlines (a char tokenizer needs no boundary care)."""
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + CHUNK_CHARS)
        nl = text.rfind("\n", start, end) if end < len(text) else -1
        end = nl + 1 if nl > start else end
        out.append(text[start:end])
        start = end
    return out


def prepare(data: DataConfig, overwrite: bool = False, quiet: bool = False) -> PrepareResult:
    """Tokenize `data.source` into `data.dir`; skip when it is already prepared from the same text."""
    files = source_files(data.source)
    digest = checksum(files)
    out = Path(data.dir)
    meta_path = out / "meta.json"
    if meta_path.is_file() and not overwrite:
        old = json.loads(meta_path.read_text())
        same = old.get("source_sha256") == digest and old.get("tokenizer") == data.tokenizer
        if same and old.get("val_fraction") == data.val_fraction:
            return PrepareResult(out, old, skipped=True)
        raise GptlabError(
            f"'{out}' already holds data prepared from another source or setting",
            "pass --overwrite, or set data.dir to a new folder",
        )
    texts = [read_text(f) for f in files]
    text = "".join(t if t.endswith("\n") else t + "\n" for t in texts)
    tokenizer = Tokenizer.train_char([text])
    dtype = token_dtype(tokenizer.vocab_size)

    chunks = _chunks(text)
    ids: list[np.ndarray] = []
    with progress_bar() as bar:
        task = bar.add_task("prepare", total=len(text), info=f"{len(files)} file(s)", visible=not quiet)
        for i in range(0, len(chunks), 8):
            batch = chunks[i : i + 8]
            ids.extend(np.asarray(e, dtype=dtype) for e in tokenizer.encode_batch(batch))
            bar.advance(task, sum(len(c) for c in batch))
    tokens = np.concatenate(ids)
    n_train = int(len(tokens) * (1 - data.val_fraction))  # nanoGPT's split: int(n * 0.9) train tokens
    train, val = tokens[:n_train], tokens[n_train:]
    if len(val) < 2 or len(train) < 2:
        raise GptlabError(f"the text has only {len(tokens)} tokens", "give more text or a larger data.val_fraction")

    out.mkdir(parents=True, exist_ok=True)
    if meta_path.exists():  # the old meta goes first, so a crash in between never reads as complete
        meta_path.unlink()
    write_atomic(out / "train.bin", train.tobytes())
    write_atomic(out / "val.bin", val.tobytes())
    tokenizer.save(out / "tokenizer.json")
    meta = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": data.tokenizer,
        "train_tokens": int(len(train)),
        "val_tokens": int(len(val)),
        "val_fraction": data.val_fraction,
        "source": data.source,
        "source_files": len(files),
        "source_sha256": digest,
    }
    write_atomic(meta_path, json.dumps(meta, indent=2).encode())  # written last: the completion marker
    return PrepareResult(out, meta, skipped=False)
