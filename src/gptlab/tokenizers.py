"""One tokenizer interface over Hugging Face `tokenizers` and `tiktoken`, stored as a standard `tokenizer.json`.

Kinds: `char` (one id per character), `bpe` (byte-level BPE trained here), `wordpiece` (byte-level WordPiece
trained here) and `gpt2` (GPT-2's BPE). Every kind is a plain HF `tokenizer.json` that `transformers` loads;
byte-level BPE files are encoded by `tiktoken` when they convert exactly (it is several times faster).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import regex
import tiktoken
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from gptlab.errors import GptlabError

KINDS = ("char", "bpe", "wordpiece", "gpt2")
TRAINABLE = ("char", "bpe", "wordpiece")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<EOS>", "<|end_of_text|>")
GPT2_EOT = "<|endoftext|>"
# tiktoken's spelling of the GPT-2 split regex: the same pieces as HF ByteLevel's, with faster possessive loops
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# sha256 of GPT-2's 50,257 vocabulary strings in id order (see `_vocab_sha256`): how a loaded file is known as GPT-2
GPT2_VOCAB_SHA256 = "3eec753ec2898a20d38172a5e4488c7612b730d67ef26d18bbdb2722c51a8c1d"
# sha256 of GPT-2's 50,000 merges as "a b" lines: with GPT-2's vocabulary, tiktoken's own gpt2, so the slow
# merge-by-merge check of `_convert` is skipped (it would cost every fresh process 0.25 s)
GPT2_MERGES_SHA256 = "04e3597d7996f292ca9b8b7285ca4d58a6ae171ac47d73fc7140ceb0c7a6bbc0"
# HF WordPiece tries every (start, end) of a word, cubic in its length (10,000 chars: 15 s), so the pre-tokenizer
# cuts words into chunks of at most this many bytes; a token never spans a chunk, so nothing else changes
WORDPIECE_CHUNK = 100
WORDPIECE_MAX_WORD = 1_000_000  # above the chunk size: no word is [UNK] for being long
# bpe/wordpiece training keeps at most this many distinct words: HF's trainer needs ~650 bytes a word (benchmarks/)
MAX_WORDS = 1_000_000
FEED_CHARS = 1 << 16  # counted words go to HF's trainer in texts of about this size
UNKNOWN_KIND_FIX = "use one of char, bpe, wordpiece, gpt2, or a path to a tokenizer.json"
GPT2_FILES_FIX = "give the folder of a GPT-2 vocab.json and merges.txt"
WHITESPACE_SPLITTERS = ("Whitespace", "WhitespaceSplit", "BertPreTokenizer")


class Tokenizer:
    """Text <-> token ids, with the vocabulary size and special ids a model needs.

    Everything is derived from `hf` (the HF object, saved as tokenizer.json), so a reloaded tokenizer is the same:
    - kind: char, bpe, wordpiece, gpt2 (GPT-2's vocabulary), or the HF model type lowercased for foreign files
    - engine: "tiktoken" when the file is a byte-level BPE that tiktoken encodes exactly, else "hf"
    - vocab_size: highest id + 1; special_ids: special token -> id; eos_id: the end-of-text id, if any
    - cut_safe: cutting text right before a single ' ' between two non-space characters never changes the ids
      (no normalizer, a pre-tokenizer that splits there, no special token holding whitespace), so a caller may
      encode a long document in pieces
    """

    hf: HFTokenizer
    kind: str
    engine: str
    vocab_size: int
    special_ids: dict[str, int]
    eos_id: int | None
    cut_safe: bool

    def __init__(self, hf: HFTokenizer) -> None:
        self.hf = hf
        text = hf.to_str()
        spec = json.loads(text)
        model = spec["model"]
        vocab = hf.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        added = hf.get_added_tokens_decoder()
        self.special_ids = {t.content: i for i, t in added.items() if t.special}
        self.eos_id = next((self.special_ids[t] for t in EOS_CANDIDATES if t in self.special_ids), None)
        pre, normalizer = spec.get("pre_tokenizer"), spec.get("normalizer")
        is_char = model["type"] == "BPE" and not model.get("merges") and pre is None and normalizer is None
        if is_char:
            self.kind = "char"
        elif (
            model["type"] == "BPE"
            and len(model["vocab"]) == 50257
            and _vocab_sha256(model["vocab"]) == GPT2_VOCAB_SHA256
        ):
            self.kind = "gpt2"
        else:
            self.kind = model["type"].lower()
        # a character tokenizer silently drops unseen characters; we remember its alphabet to refuse them
        self._alphabet = frozenset(model["vocab"]) if is_char else None
        # a cut inside a special token would split it; otherwise the pre-tokenizer decides (see `cut_safe` rule)
        # every added token (special or not) is matched before the pre-tokenizer: a cut must stay clear of them
        self.added_tokens = tuple(t.content for t in added.values())
        odd_added = any(
            any(c.isspace() for c in t.content) or t.lstrip or t.rstrip or t.single_word for t in added.values()
        )
        self.cut_safe = not odd_added and (is_char or (normalizer is None and _splits_at_spaces(pre)))
        self._special_re = _special_regex(self.special_ids)
        self._special_firsts = frozenset(s[0] for s in self.special_ids)
        self._enc = _tiktoken_encoding(text, spec, added)
        self.engine = "hf" if self._enc is None else "tiktoken"
        self._valid_ids: frozenset[int] | None = None
        self._plain: HFTokenizer | None = None  # built on first use (see `_plain_hf`)
        decoder = (spec.get("decoder") or {}).get("type")
        # the bytes of each token, where decoding is just joining them (byte-level files and characters)
        self._bytes_known = decoder == "ByteLevel" or (is_char and decoder in (None, "Fuse"))
        self._bytes: list[bytes] | None = None

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, engine={self.engine!r}, vocab_size={self.vocab_size})"

    # ----- constructors -----------------------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        kind: str,
        texts: Iterable[str],
        vocab_size: int,
        specials: Sequence[str] = (GPT2_EOT,),
        max_words: int = MAX_WORDS,
    ) -> Tokenizer:
        """Train a char, bpe or wordpiece tokenizer on `texts`, streamed once (never held in memory).

        bpe and wordpiece count words first and keep at most `max_words` distinct ones (see `count_words`).
        """
        specials = _check_specials(specials)
        if kind == "gpt2":
            raise GptlabError("tokenizer kind 'gpt2' is pretrained, not trained", "build it with Tokenizer.gpt2()")
        if kind not in TRAINABLE:
            raise GptlabError(f"tokenizer kind '{kind}' is unknown", UNKNOWN_KIND_FIX)
        if kind != "char":
            least = 256 + len(specials)  # every byte is a token, so no text is ever unknown
            if vocab_size < least:
                raise GptlabError(
                    f"vocab_size {vocab_size} is too small for a {kind} tokenizer",
                    f"use at least {least}: the 256 bytes and {len(specials)} special token(s)",
                )
        if isinstance(texts, str):  # one text, not an iterable of characters
            texts = [texts]
        seen = [0]
        stream = _training_stream(texts, _special_regex(specials), seen)
        if kind == "char":
            hf = _train_char(stream, specials)
        elif kind == "bpe":
            hf = _train_bpe(stream, vocab_size, specials, max_words)
        else:
            hf = _train_wordpiece(stream, vocab_size, specials, max_words)
        if not seen[0]:
            raise GptlabError("the text to train the tokenizer on is empty", "give it some text")
        return cls(hf)

    @classmethod
    def train_char(cls, texts: Iterable[str], specials: Iterable[str] = ()) -> Tokenizer:
        """Build a character tokenizer whose vocabulary is the sorted characters of `texts`."""
        return cls.train("char", texts, 0, list(specials))

    @classmethod
    def gpt2(cls, files: str | Path | None = None, specials: Sequence[str] = (GPT2_EOT,)) -> Tokenizer:
        """GPT-2's BPE from tiktoken (download, or TIKTOKEN_CACHE_DIR), or offline from vocab.json + merges.txt."""
        specials = _check_specials(specials)
        if GPT2_EOT not in specials:  # it is in GPT-2's vocabulary, and only ever meant as the special token
            specials = [GPT2_EOT, *specials]
        if files is None:
            vocab, merges = _gpt2_from_tiktoken()
            model = models.BPE(vocab=vocab, merges=merges)
        else:
            vocab_file, merges_file = _vocab_merges_files(Path(files))
            try:
                model = models.BPE.from_file(str(vocab_file), str(merges_file))
            except Exception as e:  # the Rust side raises a bare Exception on bad files
                raise GptlabError(f"'{vocab_file}' + '{merges_file}' are unreadable: {e}", GPT2_FILES_FIX) from e
        return cls(_byte_level(model, specials))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.json` file."""
        path = Path(path)
        if not path.is_file():
            raise GptlabError(f"tokenizer file '{path}' not found", "run `gptlab prepare` first")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON
            raise GptlabError(f"tokenizer file '{path}' is unreadable: {e}", "prepare the data again") from e

    def with_specials(self, specials: Sequence[str]) -> Tokenizer:
        """This tokenizer with the special tokens it lacks added after its highest id (itself if none is missing)."""
        missing = [s for s in _check_specials(specials) if s not in self.special_ids]
        if not missing:
            return self
        hf = HFTokenizer.from_str(self.hf.to_str())
        hf.add_special_tokens([_special(s) for s in missing])
        return Tokenizer(hf)

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` (atomically)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        self.hf.save(str(tmp))
        tmp.replace(path)

    def fingerprint(self) -> str:
        """sha256 of the canonical `tokenizer.json`: equal for equal tokenizers, also across save and load."""
        canonical = json.dumps(json.loads(self.hf.to_str()), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    # ----- encoding and decoding --------------------------------------------------------------------------------
    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of `text`; special tokens' text gets their ids with `allow_special`, else is ordinary text."""
        if self._alphabet is not None:
            self._check_alphabet(text, allow_special)
        if self._enc is not None:
            return self._encode_tiktoken(text) if allow_special else self._enc.encode_ordinary(text)
        hf = self.hf if allow_special else self._plain_hf()
        return hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], *, allow_special: bool = True) -> list[list[int]]:
        """Token ids of many texts: one thread with tiktoken (callers parallelize by process), Rust threads with HF."""
        if self._alphabet is not None:
            for text in texts:
                self._check_alphabet(text, allow_special)
        if self._enc is not None:
            encode_one = self._encode_tiktoken if allow_special else self._enc.encode_ordinary
            return [encode_one(text) for text in texts]
        hf = self.hf if allow_special else self._plain_hf()
        encode = getattr(hf, "encode_batch_fast", hf.encode_batch)  # _fast skips offsets (tokenizers>=0.21)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    @property
    def eos_token(self) -> str | None:
        """The end-of-text token's text, if the tokenizer has one."""
        return None if self.eos_id is None else self.hf.id_to_token(self.eos_id)

    def split_specials(self, text: str) -> list[str]:
        """`text` cut at its special tokens, as encoding matches them: text, special, text, ..., text."""
        return [text] if self._special_re is None else self._special_re.split(text)

    def token_bytes(self) -> list[bytes] | None:
        """The bytes each id decodes to (b"" for unused ids), when decoding is joining them; else None."""
        if not self._bytes_known:
            return None
        if self._bytes is None:
            inverse = {c: b for b, c in enumerate(byte_table())}
            byte_level = self.kind != "char"
            table = [b""] * self.vocab_size
            for token, i in self.hf.get_vocab(with_added_tokens=False).items():
                table[i] = bytes(inverse[c] for c in token) if byte_level else token.encode()
            for i, t in self.hf.get_added_tokens_decoder().items():
                table[i] = t.content.encode()
            self._bytes = table
        return self._bytes

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids, special tokens included; ids outside the vocabulary are skipped."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if self._enc is None:
            return self.hf.decode(ids, skip_special_tokens=False)
        try:
            return self._enc.decode(ids)
        except KeyError:  # an id outside the vocabulary (say, of a model's padded vocabulary): skipped, as HF does
            if self._valid_ids is None:
                self._valid_ids = frozenset(self._enc._mergeable_ranks.values()) | frozenset(self.special_ids.values())
            return self._enc.decode([i for i in ids if i in self._valid_ids])

    def _encode_tiktoken(self, text: str) -> list[int]:
        # the cheap membership test spares almost every text the regex split
        if self._special_re is None or not any(c in text for c in self._special_firsts):
            return self._enc.encode_ordinary(text)
        ids: list[int] = []
        for i, piece in enumerate(self._special_re.split(text)):
            if i % 2:
                ids.append(self.special_ids[piece])
            elif piece:
                ids.extend(self._enc.encode_ordinary(piece))
        return ids

    def _plain_hf(self) -> HFTokenizer:
        """The HF tokenizer with special tokens' text as ordinary text (like tiktoken's `encode_ordinary`)."""
        if self._plain is None:
            spec = json.loads(self.hf.to_str())
            model = spec["model"]
            if model["type"] in ("WordPiece", "WordLevel") and isinstance(model.get("vocab"), dict):
                # their trainers put the specials in the vocabulary, where a plain word could still find them
                # ("EOS" as a special): without them the text gets the pieces it would have had
                keep = model.get("unk_token")  # BERT's [UNK] is special, and the model needs it
                model["vocab"] = {t: i for t, i in model["vocab"].items() if t not in self.special_ids or t == keep}
            # without the special added tokens (HF's `encode_special_tokens` switch would do, but is lost in pickling)
            spec["added_tokens"] = [t for t in spec.get("added_tokens") or [] if not t.get("special")]
            self._plain = HFTokenizer.from_str(json.dumps(spec))
        return self._plain

    def _check_alphabet(self, text: str, allow_special: bool = True) -> None:
        unknown = set(text) - self._alphabet
        if not unknown:
            return
        outside = set(self._special_re.sub("", text)) - self._alphabet if self._special_re is not None else unknown
        if allow_special:  # characters inside special tokens are fine
            unknown = outside
        if unknown:
            shown = ", ".join(repr(c) for c in sorted(unknown)[:5])
            if not outside:  # only a special token's own characters: allowing specials is the likely fix
                special = next(s for s in self._special_re.findall(text) if set(s) - self._alphabet)
                raise GptlabError(
                    f"{special!r} is read as plain text here, and the tokenizer's vocabulary lacks its characters "
                    f"{shown}",
                    'allow special tokens (gptlab sample --allow-special, "allow_special": true in a request), '
                    "or remove it",
                )
            raise GptlabError(
                f"text has characters outside the tokenizer's vocabulary: {shown}",
                "remove them from the prompt, or prepare data that contains them",
            )


# ----- training ---------------------------------------------------------------------------------------------------
def _special(content: str) -> AddedToken:
    # normalized=False: matched on the raw text, before anything else, leftmost-longest
    return AddedToken(content, special=True, normalized=False)


def _check_specials(specials: Sequence[str]) -> list[str]:
    specials = [specials] if isinstance(specials, str) else list(specials)
    seen: set[str] = set()
    for s in specials:
        if not isinstance(s, str) or not s:
            raise GptlabError(f"special token {s!r} is empty or not text", "give each special token some characters")
        if s in seen:
            raise GptlabError(f"special token {s!r} is listed twice", "list each special token once")
        seen.add(s)
    return specials


def _special_regex(specials: Iterable[str]) -> re.Pattern[str] | None:
    """A capturing regex of the specials, longest first, so that `split` matches leftmost-longest like HF."""
    specials = sorted(specials, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None


def _training_stream(texts: Iterable[str], special_re: re.Pattern[str] | None, seen: list[int]) -> Iterator[str]:
    """The texts as encoding will see them: special tokens cut out (so no merges are spent on their pieces)."""
    for text in texts:
        if not isinstance(text, str):
            raise GptlabError(f"tokenizer training got a {type(text).__name__}, not text", "give it strings")
        seen[0] += len(text)
        if special_re is None:
            yield text
        else:
            yield from (piece for i, piece in enumerate(special_re.split(text)) if not i % 2 and piece)


def _train_char(texts: Iterable[str], specials: list[str]) -> HFTokenizer:
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    # BPE without merges is a pure character lookup, and transformers loads it as a fast tokenizer
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens([_special(s) for s in specials])
    return hf


def _byte_level_pre() -> pre_tokenizers.ByteLevel:
    # GPT-2's setup: split with its regex, no prefix space (so text round-trips exactly), bytes as printable chars
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _byte_level(model: models.Model, specials: list[str]) -> HFTokenizer:
    """A byte-level BPE tokenizer around `model`, laid out like GPT-2's own tokenizer.json."""
    hf = HFTokenizer(model)
    hf.pre_tokenizer = _byte_level_pre()
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([_special(s) for s in specials])
    return hf


def _alphabet() -> list[str]:
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _train_bpe(texts: Iterator[str], vocab_size: int, specials: list[str], max_words: int) -> HFTokenizer:
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[_special(s) for s in specials],  # first, so they get ids 0, 1, ...
        initial_alphabet=_alphabet(),  # every byte, so no text is ever unknown
        show_progress=False,  # the caller draws its own bar over the stream
    )
    model = _train_on_counts(models.BPE(), trainer, count_words(texts, max_words))
    return _byte_level(model, specials)


def count_words(texts: Iterable[str], max_words: int = MAX_WORDS) -> Counter[str]:
    """Count the GPT-2 pre-tokens of `texts`, keeping at most `max_words` distinct ones (the rarest go first).

    HF's trainers hold every distinct word several times over (about 650 bytes each), so on a large corpus the
    word list, not the text, is what fills memory. When the count passes `max_words` (checked after each text),
    only the max_words // 2 most counted words are kept (lossy counting: a word dropped early counts again
    from 0). The split is tiktoken's spelling of GPT-2's regex in the `regex` module, which matches HF's
    ByteLevel split except on letters Unicode added lately (16.0 on), which one library's tables know and
    the other's do not; training on such text differs slightly, encoding does not (it always uses HF's).
    """
    if max_words < 1:
        raise GptlabError(f"max_words must be at least 1, got {max_words}", "use at least 1; the default is 1,000,000")
    if isinstance(texts, str):  # one text, not an iterable of characters
        texts = [texts]
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(_pre_tokens().findall(text))
        if len(counts) > max_words:
            _drop_rarest(counts, max(1, max_words // 2))
    return counts


def _drop_rarest(counts: Counter[str], keep: int) -> None:
    """Keep the `keep` most counted words; among equal counts at the cut, the words seen first stay."""
    excess = len(counts) - keep
    if excess <= 0:
        return
    levels = iter(sorted(Counter(counts.values()).items()))
    boundary, words = next(levels)
    while words <= excess:  # whole count levels go, rarest first, while they fit in the excess
        excess -= words
        boundary, words = next(levels)
    cut = [w for w, c in counts.items() if c == boundary][words - excess :]  # the boundary level's latest words
    for word in [w for w, c in counts.items() if c < boundary] + cut:
        del counts[word]


@functools.cache
def _pre_tokens() -> regex.Pattern[str]:
    return regex.compile(GPT2_PATTERN)


def _train_on_counts(
    model: models.Model, trainer: trainers.Trainer, counts: Counter[str], cut: int = 0
) -> models.Model:
    """Train `model` on counted words: each written as byte-level characters, repeated, split on spaces."""
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # byte-level characters are never whitespace
    with hf_threads(False):  # HF's threads would each build a word map of their own before merging them
        hf.train_from_iterator(_repeated_words(counts, cut), trainer)
    return hf.model


def _repeated_words(counts: Counter[str], cut: int) -> Iterator[str]:
    """Texts whose whitespace-split words are the counted words, each as often as counted; empties `counts`.

    With `cut`, a word is fed in pieces of at most `cut` characters, as the WordPiece pre-tokenizer cuts it.
    """
    table = str.maketrans(dict(enumerate(byte_table())))
    batch: list[str] = []
    size = 0
    while counts:
        word, n = counts.popitem()  # popped, so the counts shrink as HF's own word map grows
        mapped = word.encode().decode("latin-1").translate(table)
        for piece in [mapped[i : i + cut] for i in range(0, len(mapped), cut)] if cut else [mapped]:
            unit, left = piece + " ", n
            while left:  # a frequent word spans many texts: HF's memory grows with the length of one text
                k = min(left, max(1, (FEED_CHARS - size) // len(unit)))
                batch.append(unit * k)
                size, left = size + k * len(unit), left - k
                if size + len(unit) > FEED_CHARS:
                    yield "".join(batch)
                    batch, size = [], 0
    if batch:
        yield "".join(batch)


@contextlib.contextmanager
def hf_threads(enabled: bool) -> Iterator[None]:
    """Switch HF tokenizers' thread pool on or off for the block (it reads TOKENIZERS_PARALLELISM at each call)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if enabled else "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _train_wordpiece(texts: Iterator[str], vocab_size: int, specials: list[str], max_words: int) -> HFTokenizer:
    # BERT's WordPiece lowercases, drops whitespace and writes word-inner pieces as '##x', so it cannot round-trip.
    # Here the words are GPT-2's byte-level pieces, which keep their whitespace inside ('Ġword'), and word-inner
    # pieces carry no prefix: every byte is then a piece wherever it stands, so greedy longest-match always
    # succeeds (no word is ever [UNK], and [UNK] is not in the vocabulary), the smallest vocabulary is 256 bytes +
    # specials as for BPE, decoding is plain ByteLevel, and transformers loads it as is. A prefix like '♯♯' would
    # need every byte a second time (256 more ids, mostly unused) for the same promise, while 'Ġ' already marks
    # most word starts. The vocabulary still comes from HF's WordPieceTrainer, and encoding is WordPiece's.
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=[_special(s) for s in specials],  # first, so they get ids 0, 1, ...
        initial_alphabet=_alphabet(),  # every byte, so no word is ever [UNK]
        continuing_subword_prefix="",
        show_progress=False,
    )
    model = models.WordPiece(
        unk_token="[UNK]", continuing_subword_prefix="", max_input_chars_per_word=WORDPIECE_MAX_WORD
    )
    model = _train_on_counts(model, trainer, count_words(texts, max_words), cut=WORDPIECE_CHUNK)
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [_byte_level_pre(), pre_tokenizers.Split(Regex(f".{{1,{WORDPIECE_CHUNK}}}"), behavior="isolated")]
    )
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([_special(s) for s in specials])
    return hf


# ----- GPT-2 ------------------------------------------------------------------------------------------------------
def _gpt2_from_tiktoken() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2's vocab and merges, recovered from tiktoken's ranks (tiktoken keeps no merges list)."""
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' ConnectionError, a hash mismatch, a read-only cache...
        raise GptlabError(
            f"could not download GPT-2's BPE from tiktoken ({type(e).__name__}: {e})",
            "set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cache, or " + GPT2_FILES_FIX,
        ) from e
    ranks = enc._mergeable_ranks  # no public accessor; transformers' tiktoken converter reads it too
    vocab = {_to_str(token): rank for token, rank in ranks.items()}
    vocab.update(enc._special_tokens)  # <|endoftext|> = 50256, also in GPT-2's own vocab.json
    merges = [(_to_str(a), _to_str(b)) for a, b in _merges_from_ranks(ranks)]
    return vocab, merges


def _vocab_merges_files(folder: Path) -> tuple[Path, Path]:
    """`vocab.json` + `merges.txt` in `folder`, or one pair `<x>vocab.json` + `<x>merges.txt` (GPT-2's if several)."""
    if not folder.is_dir():
        raise GptlabError(f"GPT-2 files folder '{folder}' is not a folder", GPT2_FILES_FIX)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder / "vocab.json", folder / "merges.txt"
    prefixes = [p.name[: -len("vocab.json")] for p in sorted(folder.glob("*vocab.json"))]
    pairs = [x for x in prefixes if (folder / f"{x}merges.txt").is_file()]
    if len(pairs) > 1:
        pairs = [x for x in pairs if "gpt2" in x.lower()] or pairs
    if len(pairs) == 1:
        return folder / f"{pairs[0]}vocab.json", folder / f"{pairs[0]}merges.txt"
    if not pairs:
        raise GptlabError(
            f"no vocab.json + merges.txt in '{folder}'", GPT2_FILES_FIX + " (or <name>vocab.json + <name>merges.txt)"
        )
    names = ", ".join(f"{x}vocab.json" for x in pairs)
    raise GptlabError(f"several vocab.json + merges.txt pairs in '{folder}': {names}", "keep one pair in the folder")


@functools.cache
def byte_table() -> tuple[str, ...]:
    """GPT-2's bytes_to_unicode: byte b is written as the printable character `byte_table()[b]`."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return tuple(chr(b) if b in printable else chr(next(extra)) for b in range(256))


def _to_str(token: bytes) -> str:
    table = byte_table()
    return "".join(table[b] for b in token)


def _bpe_parts(ranks: dict[bytes, int], token: bytes, below: int) -> list[bytes]:
    """Byte-pair merge `token` using only the ranks below `below`: for a rank-`below` token, its last merge."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while True:
        best, best_rank = -1, below
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            return parts
        parts[best : best + 2] = [parts[best] + parts[best + 1]]


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges, in rank order, that make each multi-byte token (the standard tiktoken -> BPE recovery)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts = _bpe_parts(ranks, token, rank)
            if len(parts) != 2:
                raise GptlabError(f"tiktoken token {token!r} is not one merge of two tokens", "check tiktoken's files")
            merges.append((parts[0], parts[1]))
    return merges


# ----- tiktoken engine ----------------------------------------------------------------------------------------------
_ENCODINGS: dict[str, tiktoken.Encoding | None] = {}  # by tokenizer.json sha256: checking GPT-2's merges takes 0.3 s


def _tiktoken_encoding(text: str, spec: dict, added: dict) -> tiktoken.Encoding | None:
    """The tiktoken encoding of a byte-level BPE tokenizer.json, or None when it would not give HF's ids."""
    digest = hashlib.sha256(text.encode()).hexdigest()
    if digest not in _ENCODINGS:
        if len(_ENCODINGS) >= 4:
            _ENCODINGS.pop(next(iter(_ENCODINGS)))
        try:
            ranks = _convert(spec, added)
        except Exception:  # noqa: BLE001 - an odd file: the HF engine reads it exactly, tiktoken is only faster
            ranks = None
        specials = {t.content: i for i, t in added.items()}
        enc = None
        if ranks is not None and not set(specials.values()) & set(ranks.values()):
            try:  # tiktoken refuses e.g. duplicate ids; the HF engine is always right, so fall back to it
                enc = tiktoken.Encoding(
                    "gptlab-byte-level-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials
                )
            except Exception:  # noqa: BLE001
                enc = None
        _ENCODINGS[digest] = enc
    return _ENCODINGS[digest]


def _convert(spec: dict, added: dict) -> dict[bytes, int] | None:
    """tiktoken ranks that encode exactly as this HF tokenizer.json does, or None when there are none.

    tiktoken merges, among adjacent pieces, the pair whose concatenation has the lowest id; HF merges the pair
    that comes first in its merges list. They agree when (1) ids of merge results rise in merge order, (2) every
    byte has an id, and (3) each token's own merge is the one tiktoken would find, i.e. byte-pair merging its bytes
    with the lower ids ends in exactly that pair (then tiktoken never joins two pieces in another way). Both must
    also cut the text the same way: ByteLevel with the GPT-2 regex, no prefix space, no normalizer.
    """
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return None
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return None
    if model["type"] != "BPE" or model.get("dropout") or model.get("continuing_subword_prefix"):
        return None
    if model.get("end_of_word_suffix"):
        return None
    if any(not t.special or t.lstrip or t.rstrip or t.single_word for t in added.values()):
        return None  # only plain special tokens are split out before tiktoken sees the text
    from_char = {c: b for b, c in enumerate(byte_table())}
    specials = {t.content for t in added.values()}
    # specials are split out before encoding, e.g. GPT-2's <|endoftext|>, which no merge makes
    vocab = {token: i for token, i in model["vocab"].items() if token not in specials}
    if any(c not in from_char for token in vocab for c in token):
        return None
    to_bytes = {token: bytes(from_char[c] for c in token) for token in vocab}
    ranks = {to_bytes[token]: i for token, i in vocab.items()}
    if len(set(ranks.values())) != len(ranks) or sum(len(t) == 1 for t in ranks) != 256:
        return None
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges") or []]  # old: "a b"
    known = _merges_sha256(merges) == GPT2_MERGES_SHA256 and _vocab_sha256(model["vocab"]) == GPT2_VOCAB_SHA256
    last, made = -1, 0
    for a, b in merges:
        if a not in to_bytes or b not in to_bytes:
            return None
        left, right = to_bytes[a], to_bytes[b]
        rank = ranks.get(left + right)
        if rank is None or rank <= last:
            return None
        if not known and len(left) + len(right) > 2 and _bpe_parts(ranks, left + right, rank) != [left, right]:
            return None
        last, made = rank, made + 1
    if made != len(ranks) - 256:  # a token no merge makes: tiktoken could still produce it
        return None
    return ranks


def _splits_at_spaces(pre: dict | None) -> bool:
    """Whether the pre-tokenizer always ends a piece before a ' ' that follows a non-space (and starts one after)."""
    if not pre:
        return False
    kind = pre.get("type")
    if kind == "Sequence":
        return any(_splits_at_spaces(p) for p in pre.get("pretokenizers", []))
    if kind == "ByteLevel":
        return pre.get("use_regex", True)
    if kind == "Metaspace":
        return pre.get("split", True)
    return kind in WHITESPACE_SPLITTERS


def _merges_sha256(merges: list) -> str:
    return hashlib.sha256("\n".join(f"{a} {b}" for a, b in merges).encode()).hexdigest()


def _vocab_sha256(vocab: dict[str, int]) -> str:
    return hashlib.sha256(json.dumps(sorted(vocab, key=vocab.get), ensure_ascii=False).encode()).hexdigest()
