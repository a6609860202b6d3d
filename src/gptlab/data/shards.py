"""`prepare`: a text source -> tokenizer.json + fixed-size token shards + meta.json, streamed and resumable.

A prepared folder holds `tokenizer.json`, shards `train_00000.bin`, ..., `val_00000.bin`, ... (raw token
arrays: `np.memmap(path, dtype=meta["dtype"], mode="r")`, `data.shard_tokens` tokens each but the last)
and `meta.json`. A shard is written under a temporary name, fsynced and renamed; then meta.json is
rewritten atomically with the shard's entry, its completion marker. Each entry records where in the
chunk stream the next shard starts, so an interrupted prepare resumes after its last entry, and a shard
without an entry is never read. Memory is bounded by the chunks in flight, not by the corpus.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.chat import CONFIG_FILE, TEMPLATE_FILE
from gptlab.config import DataConfig
from gptlab.data.batches import file_sha256, load_prepared
from gptlab.data.chunking import Chunk, chunk_stream
from gptlab.data.sources import FileSource, HubSource, SimpleBooksSource, Source, open_source
from gptlab.data.tokenizer_setup import build_tokenizer
from gptlab.errors import GptlabError, is_write_failure, write_error
from gptlab.progress import bytes_bar, console
from gptlab.tokenizers import Tokenizer, hf_threads

FORMAT_VERSION = 2
PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal a process gets when its parent dies
TASK_CHARS = 1 << 18  # text per task sent to a worker: process hops cost little, and work spreads evenly
SPLITS = ("train", "val")
# settings that decide the bytes of the shards (and where a resumed prepare continues); not `workers`
SHARD_SETTINGS = (
    "source", "tokenizer", "vocab_size", "max_words", "special_tokens", "gpt2_files", "text_field", "hub_split",
    "errors", "split", "val_fraction", "shard_tokens", "chunk_chars", "dtype", "val_source", "val_hub_split",
    "doc_separator",
)  # fmt: skip
DEFAULTS = asdict(DataConfig())
# settings added after data was prepared without them: such data was prepared as their defaults say (a .txt with
# separators in it was one document then; it stays as prepared until --overwrite)
LATER_SETTINGS = ("val_source", "val_hub_split", "doc_separator")


def token_dtype(vocab_size: int, forced: str = "auto") -> np.dtype:
    """uint16 when every id fits (or as forced), else uint32."""
    fits16 = vocab_size <= 1 << 16
    if forced == "auto":
        return np.dtype(np.uint16) if fits16 else np.dtype(np.uint32)
    if forced == "uint16" and not fits16:
        raise GptlabError(
            f"data.dtype=uint16 cannot hold the {vocab_size} token ids of this tokenizer",
            "use data.dtype=uint32 or auto",
        )
    return np.dtype(forced)


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to a temporary name, fsync, then rename over `path`; a failed write removes the temporary file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException as e:  # a failed write, or Ctrl-C in the middle of one
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno:  # named as the file meant (OSError picks the subclass for the errno)
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


@dataclass
class PrepareResult:
    """What `prepare` did: where, the final meta.json, and whether it found the data already complete."""

    dir: Path
    meta: dict[str, Any]
    skipped: bool


class ShardWriter:
    """Appends one split's tokens to fixed-size shards; calls `on_shard()` after each shard's rename."""

    def __init__(self, out: Path, split: str, shard_tokens: int, eot: int | None, meta: dict, on_shard):
        self.out, self.split, self.shard_tokens, self.eot = out, split, shard_tokens, eot
        self.entries, self.on_shard = meta["shards"][split], on_shard
        self.file = None
        self.tokens = self.docs = 0

    def write(self, tokens: np.ndarray, chunk: int, offset: int = 0) -> None:
        """Append tokens of stream chunk `chunk` (from its token `offset` on), closing each shard as it fills."""
        done = 0
        while done < len(tokens):
            if self.file is None:
                self.final = self.out / shard_name(self.split, len(self.entries))
                self.tmp = self.final.with_name(f".{self.final.name}.tmp")
                self.file, self.tokens, self.docs = open(self.tmp, "wb"), 0, 0
            part = tokens[done : done + self.shard_tokens - self.tokens]
            self.file.write(part.tobytes())
            self.docs += int(np.count_nonzero(part == self.eot)) if self.eot is not None else 0
            self.tokens += len(part)
            done += len(part)
            if self.tokens == self.shard_tokens:  # the next shard starts `offset + done` tokens into this chunk
                self._close(chunk + 1, 0) if done == len(tokens) else self._close(chunk, offset + done)

    def finish(self, end_chunk: int) -> None:
        """Close the last, partial shard."""
        if self.file is not None:
            self._close(end_chunk, 0)

    def _close(self, next_chunk: int, skip: int) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        self.tmp.replace(self.final)
        self.entries.append(
            {
                "file": self.final.name,
                "tokens": self.tokens,
                "documents": self.docs,
                "next_chunk": next_chunk,
                "skip": skip,
            }
        )
        self.on_shard()


# ----- encoding in worker processes ---------------------------------------------------------------
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str, parent: int) -> None:
    global _worker_tokenizer
    _die_with_parent(parent)
    # Ctrl-C reaches the whole process group: the parent alone handles it (then shuts the pool down); SIGTERM
    # kills, whatever handler a forked worker inherited from the CLI
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _worker_tokenizer is None:  # a forked worker already has the parent's
        _worker_tokenizer = Tokenizer.load(tokenizer_path)


def _die_with_parent(parent: int) -> None:
    """End this worker when process `parent` dies, even by SIGKILL: an orphan would wait on its queue forever."""
    if sys.platform == "linux":
        try:
            if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0:
                if os.getppid() != parent:  # the parent died before the kernel was told to watch it
                    os._exit(1)
                return
        except (OSError, AttributeError):  # no prctl in this libc: watch from a thread instead
            pass
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="watch-parent").start()


def _watch_parent(parent: int) -> None:
    """Elsewhere: poll, since an orphan is adopted by another process and its parent id changes."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _encode(texts: list[str], dtype: str) -> list[np.ndarray]:
    # prepared text is trusted: special tokens' text (say, <|endoftext|> between documents) gets their ids
    return [np.asarray(ids, dtype=dtype) for ids in _worker_tokenizer.encode_batch(texts, allow_special=True)]


class _InProcess(Executor):
    """The one-worker case: encode right here, with the same task interface as the pool."""

    def submit(self, fn, /, *args, **kwargs) -> Future:  # noqa: ANN001
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(e)
        return future


def _executor(workers: int, tokenizer: Tokenizer, tokenizer_path: Path) -> Executor:
    global _worker_tokenizer
    fork = sys.platform == "linux"  # macOS and Windows spawn: forking is unsafe or absent there
    _worker_tokenizer = tokenizer if workers <= 1 or fork else None
    if workers <= 1:
        return _InProcess()
    # fork starts workers in milliseconds, each inheriting the loaded tokenizer
    context = multiprocessing.get_context("fork" if fork else "spawn")
    args = (str(tokenizer_path), os.getpid())
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=args)


def _tasks(chunks: Iterator[tuple[int, Chunk]]) -> Iterator[list[tuple[int, Chunk]]]:
    """Group consecutive chunks into tasks of about TASK_CHARS characters."""
    task, size = [], 0
    for item in chunks:
        task.append(item)
        size += len(item[1].text)
        if size >= TASK_CHARS:
            yield task
            task, size = [], 0
    if task:
        yield task


# ----- prepare ------------------------------------------------------------------------------------
def _settings(data: DataConfig) -> dict[str, Any]:
    d = asdict(data)
    return {k: d[k] for k in SHARD_SETTINGS}


def _same_settings(old: Any, new: dict[str, Any], tokenizer: str) -> bool:
    """Whether shards made with `old` settings are the ones `new` asks for."""
    if isinstance(old, dict) and tokenizer not in ("bpe", "wordpiece"):  # max_words trains nothing here (and
        old = {**old, "max_words": new["max_words"]}  # data prepared before it existed does not list it)
    if isinstance(old, dict):
        old = {**{k: DEFAULTS[k] for k in LATER_SETTINGS}, **old}
    return old == new


def open_sources(data: DataConfig, quiet: bool = True) -> tuple[Source, Source | None]:
    """The train source and, with data.val_source, the validation one, refused where they share text."""
    source = open_source(data.source, data.text_field, data.errors, data.hub_split, data.doc_separator)
    if not data.val_source:
        return source, None
    next(iter(source.pieces()), None)  # offline or empty: said now, not after the validation source's check
    try:
        val = open_source(data.val_source, data.text_field, data.errors, data.val_hub_split, data.doc_separator)
    except GptlabError as e:
        raise _val_error(e) from e
    apart = "give data.val_source a text apart from the training text, or unset it to carve val out of data.source"
    if isinstance(source, FileSource) and isinstance(val, FileSource):
        train_files = {p.resolve() for p in source.paths()}
        shared = next((p for p in val.paths() if p.resolve() in train_files), None)
        if shared is not None:
            raise GptlabError(f"'{shared}' is in both data.source and data.val_source", apart)
    same_split = (isinstance(source, HubSource) and isinstance(val, HubSource)
                  and (source.name, source.config, source.split) == (val.name, val.config, val.split))  # fmt: skip
    same_split |= (isinstance(source, SimpleBooksSource) and isinstance(val, SimpleBooksSource)
                   and source.path == val.path)  # fmt: skip
    if same_split:
        raise GptlabError(
            f"data.source and data.val_source read the same split '{data.hub_split}' of {data.source}",
            "set data.val_hub_split to its validation split (e.g. validation)",
        )
    if data.val_fraction not in (0.0, DEFAULTS["val_fraction"]) and not quiet:
        console.print(f"note: data.val_fraction={data.val_fraction} is not used: data.val_source is the val split")
    try:  # its first piece now, before a tokenizer is trained or a folder written: empty, missing or offline
        next(iter(val.pieces()), None)
    except GptlabError as e:
        raise _val_error(e) from e
    return source, val


def _val_error(e: GptlabError) -> GptlabError:
    """A source's error as the validation source's: its fix names data.val_source, and the way back."""
    fix = e.fix.replace("data.source", "data.val_source") + ", or data.val_source=null to carve val out of data.source"
    return GptlabError(f"data.val_source: {e.what}", fix)


def read_meta(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("shards", {}), dict):
            raise ValueError("not a gptlab meta.json")
        return meta
    except (ValueError, UnicodeDecodeError) as e:
        raise GptlabError(f"'{path}' is corrupted: {e}", "run `gptlab prepare --overwrite` again") from e


def clear_prepared(out: Path) -> None:
    """Remove what a prepare writes (meta.json first, so nothing reads as complete meanwhile)."""
    (out / "meta.json").unlink(missing_ok=True)
    for split in (*SPLITS, "test"):  # a task's examples have a test split too
        for p in out.glob(f"{split}_*.bin"):
            p.unlink()
    (out / "tokenizer.json").unlink(missing_ok=True)
    (out / TEMPLATE_FILE).unlink(missing_ok=True)
    (out / CONFIG_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def _writing(out: Path) -> Iterator[None]:
    """A full disk or a read-only folder as the user's error, with the unfinished shards' temporary files removed."""
    try:
        yield
    except Exception as e:  # the tokenizers library reports its OSErrors as plain Exceptions
        if not is_write_failure(e):
            raise
        for p in out.glob(".*.tmp*"):
            with contextlib.suppress(OSError):
                p.unlink()
        err = write_error(e, getattr(e, "filename", None) or out)
        raise GptlabError(err.what, f"{err.fix}; the same prepare then resumes") from e


def prepare(data: DataConfig, overwrite: bool = False, quiet: bool = False) -> PrepareResult:
    """Tokenize `data.source` into shards in `data.dir`; skip when done, resume when interrupted."""
    out = Path(data.dir)
    if out.exists() and not out.is_dir():
        raise GptlabError(f"data.dir '{out}' is a file", "set data.dir to a folder")
    if data.format == "sft":  # prompt/response examples: their own small writer, in the sibling module
        from gptlab.data.examples import prepare_examples

        return prepare_examples(data, overwrite, quiet)
    source, val = open_sources(data, quiet)
    settings, fingerprint = _settings(data), source.fingerprint()
    if val is not None:
        fingerprint += ":" + val.fingerprint()
    if data.tokenizer.endswith(".json") and Path(data.tokenizer).is_file():  # a changed file is another setting
        fingerprint += ":" + file_sha256(Path(data.tokenizer))
    meta_path = out / "meta.json"
    meta = None if overwrite else read_meta(meta_path)
    created = not out.exists()  # a prepare that ends with too little text removes what it wrote
    if meta is not None:
        same = (
            _same_settings(meta.get("settings"), settings, data.tokenizer)
            and meta.get("source_fingerprint") == fingerprint
        )
        if not same or meta.get("format_version") != FORMAT_VERSION:
            raise GptlabError(
                f"'{out}' already holds data prepared from another source or setting",
                "pass --overwrite, or set data.dir to a new folder",
            )
        if meta.get("complete"):
            load_prepared(out)  # the listed shards and the tokenizer are still there, whole
            return PrepareResult(out, meta, skipped=True)
        tokenizer = Tokenizer.load(out / "tokenizer.json")  # resume with the tokenizer the shards began with
        if file_sha256(out / "tokenizer.json") != meta.get("tokenizer_sha256"):
            raise GptlabError(f"'{out / 'tokenizer.json'}' changed since the shards were written", "pass --overwrite")
    else:
        if data.tokenizer in ("bpe", "wordpiece") and data.dtype == "uint16":
            token_dtype(data.vocab_size, data.dtype)  # before training: refuse a vocabulary that cannot fit
        tokenizer = build_tokenizer(data, source, quiet=quiet, val_source=val)  # before clearing: it may live in `out`
        token_dtype(tokenizer.vocab_size, data.dtype)  # refuse before anything is deleted
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise GptlabError(
                f"cannot create data.dir '{out}': {e.strerror}", "set data.dir to a writable folder"
            ) from e
        with _writing(out):
            clear_prepared(out)
            tokenizer.save(out / "tokenizer.json")
            meta = _new_meta(data, settings, source, val, fingerprint, tokenizer, out)
            write_atomic(meta_path, json.dumps(meta, indent=2).encode())
    for p in out.glob(".*.tmp*"):  # shards an interrupted run left unfinished
        p.unlink()
    with _writing(out):
        docs = _write_shards(data, source, val, tokenizer, out, meta, quiet)
        counts = {s: sum(e["tokens"] for e in meta["shards"][s]) for s in SPLITS}
        if min(counts.values()) < 2:
            # a folder of this text would only need --overwrite for the next try: leave none behind
            clear_prepared(out)
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()
            raise _too_little(data, counts, docs)
        meta.update(
            complete=True,
            train_tokens=counts["train"],
            val_tokens=counts["val"],
            documents=sum(e["documents"] for s in SPLITS for e in meta["shards"][s]),
        )
        write_atomic(meta_path, json.dumps(meta, indent=2).encode())
    return PrepareResult(out, meta, skipped=False)


def _too_little(data: DataConfig, counts: dict[str, int], docs: dict[str, int]) -> GptlabError:
    """The error for a split of fewer than 2 tokens (a window needs an input and a target), with a fix that works."""
    train, val = counts["train"], counts["val"]
    if data.val_source:
        if train < 2:
            return GptlabError(f"data.source '{data.source}' gives {train} train tokens", "give it more text")
        return GptlabError(f"data.val_source '{data.val_source}' gives {val} val tokens", "give it more text")
    if data.split == "document" and val < 2:
        n = docs["train"] + docs["val"]
        one = ""
        if n == 1 and data.doc_separator:
            one = f"; a text file is one document unless data.doc_separator ('{data.doc_separator}') occurs in it"
        elif n == 1:
            one = "; data.doc_separator=null reads a text file as one document"
        return GptlabError(
            f"data.split=document drew {docs['val']} of the {n:,} document(s) of '{data.source}' for validation at "
            f"data.val_fraction={data.val_fraction}, {val} val tokens{one}",
            "set data.val_source to a validation file, or data.split=tail",
        )
    if val < 2:
        return GptlabError(
            f"the last {data.val_fraction} of '{data.source}' gives {val} val tokens",
            "set data.val_source to a validation file, or give more text or a larger data.val_fraction",
        )
    return GptlabError(
        f"'{data.source}' gives {train} train and {val} val tokens", "give more text or a smaller data.val_fraction"
    )


def _new_meta(
    data: DataConfig,
    settings: dict,
    source: Source,
    val: Source | None,
    fingerprint: str,
    tokenizer: Tokenizer,
    out: Path,
) -> dict[str, Any]:
    eos = data.special_tokens[0] if data.special_tokens else None
    return {
        "format_version": FORMAT_VERSION,
        "complete": False,
        "settings": settings,
        "source": data.source,
        "source_description": source.description,
        **({"val_source": data.val_source, "val_source_description": val.description} if val else {}),
        "source_fingerprint": fingerprint,
        "tokenizer": tokenizer.kind,
        "tokenizer_sha256": file_sha256(out / "tokenizer.json"),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.special_ids[eos] if eos else None,
        "dtype": token_dtype(tokenizer.vocab_size, data.dtype).name,
        "shards": {split: [] for split in SPLITS},
    }


def _write_shards(
    data: DataConfig, source: Source, val: Source | None, tokenizer: Tokenizer, out: Path, meta: dict, quiet: bool
) -> dict[str, int]:
    """Encode and write the shards still missing; return the documents of each split (counted over all chunks)."""
    meta_path = out / "meta.json"
    dtype = np.dtype(meta["dtype"])
    eot = np.asarray([meta["eot_id"]] if meta["eot_id"] is not None else [], dtype=dtype)

    def save_meta() -> None:
        write_atomic(meta_path, json.dumps(meta, indent=2).encode())

    writers = {s: ShardWriter(out, s, data.shard_tokens, meta["eot_id"], meta, save_meta) for s in SPLITS}
    # where each split resumes: chunk index and tokens of it already in earlier shards
    resume = {s: (e[-1]["next_chunk"], e[-1]["skip"]) if e else (0, 0) for s, e in meta["shards"].items()}
    chunks = chunk_stream(source, tokenizer, data.chunk_chars, data.split, data.val_fraction, val)
    sizes = [source.total_bytes(), val.total_bytes() if val is not None else 0]
    total = None if None in sizes else sum(sizes)
    docs = dict.fromkeys(SPLITS, 0)
    workers = data.workers or os.cpu_count() or 1
    with bytes_bar() as bar:
        task_id = bar.add_task("prepare", total=total, info=f"{workers} worker(s)", visible=not quiet)

        def needed() -> Iterator[tuple[int, Chunk]]:
            for i, c in enumerate(chunks):
                docs[c.split] += c.doc_end
                if i >= resume[c.split][0]:
                    yield i, c
                else:
                    bar.advance(task_id, c.nbytes)

        n_chunks = 0
        # one process per core is the parallelism: the HF thread pool stays off in the workers
        threads = hf_threads(False) if workers > 1 else contextlib.nullcontext()
        with threads, _executor(workers, tokenizer, out / "tokenizer.json") as pool:
            inflight: deque[tuple[list, Future]] = deque()

            def drain_one() -> None:
                task, future = inflight.popleft()
                for (i, c), ids in zip(task, future.result()):
                    if c.doc_end:
                        ids = np.concatenate([ids, eot])
                    start, skip = resume[c.split]
                    skip = skip if i == start else 0
                    writers[c.split].write(ids[skip:], i, skip)
                    bar.advance(task_id, c.nbytes)

            try:
                for task in _tasks(needed()):
                    inflight.append((task, pool.submit(_encode, [c.text for _, c in task], dtype.name)))
                    n_chunks = task[-1][0] + 1
                    if len(inflight) >= 2 * workers:
                        drain_one()
                while inflight:
                    drain_one()
            except BrokenProcessPool as e:
                raise GptlabError(
                    "an encoding worker process died (out of memory?)",
                    "lower data.workers or data.chunk_chars, then run the same prepare again: it resumes",
                ) from e
        n_chunks = max([n_chunks, *(r[0] for r in resume.values())])
        for w in writers.values():
            w.finish(n_chunks)
    return docs
