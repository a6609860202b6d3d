"""Cut a stream of documents into chunks that encode to exactly the ids of the whole documents.

A byte-level BPE (GPT-2's regex), WordPiece over the same pre-tokenizer, and the character tokenizer all
split before a single space that has a non-space character on each side: no pre-token spans it, and
the piece that starts there depends only on the text after it. Cutting anywhere else can change the
ids (GPT-2 encodes "\\n\\n  c" as 628,... whole but 198,198,... cut at the newline), so we never do.
Special tokens are matched before the pre-tokenizer runs, so no cut falls inside or next to one.
"""

from __future__ import annotations

import itertools
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from gptlab.data.sources import Source
from gptlab.errors import GptlabError
from gptlab.tokenizers import Tokenizer

SAFE_SPACE = re.compile(r"(?<=\S) (?=\S)")


@dataclass(frozen=True)
class Chunk:
    """A piece of one document bound for one split; `doc_end` chunks are followed by the end-of-text id."""

    split: str
    text: str
    doc_end: bool
    nbytes: int  # source bytes this chunk accounts for, for the MB/s bar


class Chunker:
    """Buffers one split's text and yields ~`size`-character chunks cut only at safe places."""

    def __init__(self, size: int, tokenizer: Tokenizer) -> None:
        self.size = size
        self.anywhere = tokenizer.kind == "char"  # one token per character: any cut outside a special is safe
        self.whole = not tokenizer.cut_safe  # an unknown pre-tokenizer: encode each document whole
        # every added token is matched before the pre-tokenizer, like the specials
        self.specials = sorted(tokenizer.added_tokens, key=len, reverse=True)
        self.longest = max(map(len, self.specials), default=0)
        self.buf, self.pos, self.nbytes = "", 0, 0
        self.scanned = 0  # the forward search for a cut resumes here, so a text without one is read once

    def _clear_of_specials(self, text: str, i: int) -> bool:
        """No special token occurrence covers or touches the cut before position `i`."""
        lo, hi = max(0, i - self.longest - 1), i + self.longest + 1
        for special in self.specials:
            s = text.find(special, lo, hi)
            while s != -1:
                if s <= i + 1 and s + len(special) >= i:
                    return False
                s = text.find(special, s + 1, hi)
        return True

    def _safe(self, text: str, i: int) -> bool:
        if self.anywhere:
            return self._clear_of_specials(text, i)
        return (
            0 < i < len(text) - 1
            and text[i] == " "
            and not text[i - 1].isspace()
            and not text[i + 1].isspace()
            and self._clear_of_specials(text, i)
        )

    def _cut(self) -> int | None:
        """A safe cut near pos + size: the last one before it, else the first after it; None: need more text."""
        buf, target = self.buf, self.pos + self.size
        # a special token may still be arriving at the buffer's end: cut only where all of one would be seen
        end = len(buf) - self.longest - 1
        if self.whole or end <= target:
            return None
        lo = self.pos + max(1, self.size // 2)  # never an empty chunk
        if self.anywhere:
            i = target
            while i > lo and not self._safe(buf, i):
                i -= 1
            return i if i > lo else None
        i = buf.rfind(" ", lo, target)
        while i != -1:
            if self._safe(buf, i):
                return i
            i = buf.rfind(" ", lo, i)
        for m in SAFE_SPACE.finditer(buf, max(target, self.scanned), end):
            if self._safe(buf, m.start()):
                return m.start()
        self.scanned = max(self.scanned, end - 1)  # (-1: the space's left neighbour is part of the test)
        return None

    def feed(self, text: str, nbytes: int, flush: bool, doc_end: bool, split: str) -> Iterator[Chunk]:
        """Add text; yield the chunks that are ready, and with `flush` the rest (the end of a document)."""
        self.scanned = max(0, self.scanned - self.pos)
        self.buf = self.buf[self.pos :] + text if self.pos else self.buf + text
        self.pos = 0
        self.nbytes += nbytes
        while (i := self._cut()) is not None:
            yield Chunk(split, self.buf[self.pos : i], False, self.nbytes)
            self.pos, self.nbytes = i, 0
        if flush:
            rest = self.buf[self.pos :]
            if rest or doc_end:
                yield Chunk(split, rest, doc_end, self.nbytes)
            self.buf, self.pos, self.nbytes, self.scanned = "", 0, 0, 0


def is_val_document(index: int, val_fraction: float) -> bool:
    """Document split: a fixed hash of the document's index decides, so every run agrees."""
    return zlib.crc32(index.to_bytes(8, "little")) < val_fraction * 2**32


def chunk_stream(
    source: Source,
    tokenizer: Tokenizer,
    chunk_chars: int,
    split: str,
    val_fraction: float,
    val_source: Source | None = None,
) -> Iterator[Chunk]:
    """The source as train/val chunks in a fixed order: `split` is "tail" (by bytes) or "document"; with a
    `val_source`, all of `source` is train and all of `val_source` val, in that order."""
    chunkers = {"train": Chunker(chunk_chars, tokenizer), "val": Chunker(chunk_chars, tokenizer)}
    if val_source is not None:
        for name, src in (("train", source), ("val", val_source)):
            for piece in src.pieces():
                yield from chunkers[name].feed(piece.text, piece.nbytes, piece.doc_end, piece.doc_end, name)
            yield from chunkers[name].feed("", 0, True, False, name)  # a source may end without closing a document
        return
    pieces = iter(source.pieces())
    first = next(pieces, None)  # a download source knows its size once it has started
    train_bytes = None
    if split == "tail":
        total = source.total_bytes()
        if total is None:
            raise GptlabError(
                "data.split=tail needs a source whose size is known before reading it",
                "set data.split=document for a hub dataset",
            )
        train_bytes = int(total * (1 - val_fraction))  # nanoGPT's rule: the first 90% of the text is train
    seen, doc, current = 0, 0, "train"
    for piece in itertools.chain([first] if first is not None else [], pieces):
        text, nbytes = piece.text, piece.nbytes
        if train_bytes is None:
            current = "val" if is_val_document(doc, val_fraction) else "train"
        elif current == "train" and seen + nbytes > train_bytes:
            # the split falls inside this piece: keep the characters wholly within the train bytes, or, when
            # the source bytes are not the text's (JSON escapes, replaced bytes), the same fraction of them
            raw = text.encode("utf-8")
            if len(raw) == nbytes:
                head = len(raw[: train_bytes - seen].decode("utf-8", errors="ignore"))
            else:
                head = len(text) * (train_bytes - seen) // nbytes
            yield from chunkers["train"].feed(text[:head], train_bytes - seen, True, False, "train")
            text, nbytes, current = text[head:], seen + nbytes - train_bytes, "val"
        yield from chunkers[current].feed(text, nbytes, piece.doc_end, piece.doc_end, current)
        seen += piece.nbytes
        doc += piece.doc_end
    for name, chunker in chunkers.items():  # a source may end without closing its last document
        yield from chunker.feed("", 0, True, False, name)
