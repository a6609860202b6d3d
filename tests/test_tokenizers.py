"""Tokenizers: exact round trips, special tokens, parity with HF `tokenizers`, `transformers` and `tiktoken`."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiktoken
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from gptlab.errors import GptlabError
from gptlab.tokenizers import KINDS, Tokenizer, count_words

EOT = "<|endoftext|>"
# GPT-2's files and a tiktoken cache made from them; read when present (a copy of the cache: tiktoken writes into it)
FIXTURES = Path(
    os.environ.get("GPTLAB_CS336_FIXTURES", Path(__file__).resolve().parents[2] / "shared/data/cs336_fixtures")
)
GPT2_FILES = FIXTURES / "spring2024" / "tests" / "fixtures"
needs_gpt2 = pytest.mark.skipif(
    not (GPT2_FILES / "gpt2_vocab.json").is_file(), reason=f"GPT-2's vocab.json/merges.txt not found under {FIXTURES}"
)
needs_cache = pytest.mark.skipif(
    not (FIXTURES / "tiktoken_cache").is_dir(), reason=f"no tiktoken cache of GPT-2's files under {FIXTURES}"
)

TRICKY = [
    "café naïve Ångström ÆØÅ",
    "日本語のテキストと中文",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 thumb",
    "tabs\t\there\tand\tthere",
    "\n\n  indented after blank lines\n\n\n",
    "trailing spaces   ",
    "   leading spaces",
    "mixed 123 4567 don't it's WE'LL 'S",
    "nbsp\u00a0and\u3000ideographic\u2028line\u0085next",
    "punctuation!!! ... --- === ??? #hash ##two",
    "a\n\n  c",
    "",
]
SPECIAL_TEXTS = ["a<|endoftext|>b", "<|endoftext|>", "x <|endoftext|>\n\n<|endoftext|><|endoftext|> y"]
PIECES = [
    "the",
    "king",
    "<|pad|",
    "end|>",
    "queen",
    "hello",
    "Ω",
    "é",
    "日本",
    "👨‍👩‍👧",
    "don't",
    "it's",
    "123",
    ".",
    ",",
    "!?",
]
SPACES = [" ", "  ", "\t", "\n", "\n\n", "\n\n  ", " \n ", "   "]


def corpus(lines: int = 300, seed: int = 0) -> Iterator[str]:
    """Small training text, one piece at a time: words, tricky pieces, many blank lines, and every TRICKY line."""
    rng = random.Random(seed)
    yield from TRICKY
    for _ in range(lines):
        words = [rng.choice(PIECES) for _ in range(rng.randint(3, 12))]
        yield " ".join(words) + rng.choice([".\n", "\n\n", "\n\n\n", "  \n"])


def tricky_text(seed: int, n: int = 300) -> str:
    """Random text from words, unicode, special tokens and whitespace runs."""
    rng = random.Random(seed)
    return "".join(rng.choice(PIECES + [EOT]) + rng.choice(SPACES + [" "] * 8) for _ in range(n))


def one_shot(texts: Iterator[str]) -> Iterator[str]:
    """A stream that can be read only once, like a corpus streamed from disk."""
    yield from texts


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (GPT2_FILES / "gpt2_vocab.json").is_file():
        pytest.skip(f"GPT-2's vocab.json/merges.txt not found under {FIXTURES}")
    out = tmp_path_factory.mktemp("gpt2")
    for name in ("gpt2_vocab.json", "gpt2_merges.txt"):
        shutil.copy(GPT2_FILES / name, out / name)
    return out


@pytest.fixture(scope="module")
def tiktoken_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (FIXTURES / "tiktoken_cache").is_dir():
        pytest.skip(f"no tiktoken cache of GPT-2's files under {FIXTURES}")
    out = tmp_path_factory.mktemp("tiktoken") / "cache"
    shutil.copytree(FIXTURES / "tiktoken_cache", out)
    return out


@pytest.fixture(scope="module")
def toks(request: pytest.FixtureRequest) -> dict[str, Tokenizer]:
    """One small tokenizer of each trainable kind (and GPT-2's when its files are here)."""
    out = {
        "char": Tokenizer.train("char", one_shot(corpus()), 0),
        "bpe": Tokenizer.train("bpe", one_shot(corpus()), 400),
        "wordpiece": Tokenizer.train("wordpiece", one_shot(corpus()), 700),
    }
    if (GPT2_FILES / "gpt2_vocab.json").is_file():
        out["gpt2"] = Tokenizer.gpt2(files=request.getfixturevalue("gpt2_dir"))
    return out


def kind_param() -> list:
    return [pytest.param(k, marks=needs_gpt2) if k == "gpt2" else k for k in KINDS]


@pytest.fixture
def tok(request: pytest.FixtureRequest, toks: dict[str, Tokenizer]) -> Tokenizer:
    return toks[request.param]


def hf_byte_level_pair(folder: Path, texts: list[str], vocab_size: int) -> tuple[Path, Path]:
    """A byte-level BPE vocab.json + merges.txt trained by HF `tokenizers` itself, GPT-2's way."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    hf.model.save(str(folder))
    return folder / "vocab.json", folder / "merges.txt"


def hf_reference(vocab: Path, merges: Path) -> HFTokenizer:
    ref = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = decoders.ByteLevel()
    return ref


# ----- every kind ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tok", kind_param(), indirect=True)
def test_round_trip_is_exact(tok: Tokenizer) -> None:
    texts = TRICKY + SPECIAL_TEXTS + [tricky_text(1)]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.eos_id == tok.special_ids[EOT]


@pytest.mark.parametrize("tok", kind_param(), indirect=True)
def test_specials_in_text_get_their_own_id(tok: Tokenizer) -> None:
    eot = tok.special_ids[EOT]
    assert tok.encode(EOT) == [eot]
    assert tok.encode("a<|endoftext|>b") == tok.encode("a") + [eot] + tok.encode("b")
    assert tok.encode("a <|endoftext|><|endoftext|>\n") == tok.encode("a ") + [eot, eot] + tok.encode("\n")
    assert tok.decode([eot]) == EOT
    # the HF object (and so transformers) agrees, whichever library encodes
    for text in SPECIAL_TEXTS:
        assert tok.encode(text) == tok.hf.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("kind", KINDS)
def test_longest_special_wins(kind: str, request: pytest.FixtureRequest) -> None:
    specials = (EOT, "<|end|>", "<|end|><|pad|>")
    if kind == "gpt2":
        tok = Tokenizer.gpt2(files=request.getfixturevalue("gpt2_dir"), specials=specials)
        assert (tok.engine, tok.special_ids["<|end|>"], tok.special_ids["<|end|><|pad|>"]) == ("tiktoken", 50257, 50258)
    else:
        tok = Tokenizer.train(kind, one_shot(corpus(60)), 600, specials)
    end, both = tok.special_ids["<|end|>"], tok.special_ids["<|end|><|pad|>"]
    text = "k<|end|><|pad|>q<|end|>h<|end|><|pad|"
    assert tok.encode(text) == tok.encode("k") + [both] + tok.encode("q") + [end] + tok.encode("h") + [
        end
    ] + tok.encode("<|pad|")
    assert tok.encode(text) == tok.hf.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_trained_specials_come_first(kind: str) -> None:
    tok = Tokenizer.train(kind, one_shot(corpus(30)), 700, (EOT, "<pad>"))
    assert tok.special_ids == {EOT: 0, "<pad>": 1}


def test_special_equal_to_a_learned_token_wins(tmp_path: Path) -> None:
    vocab, merges = hf_byte_level_pair(tmp_path / "pair", ["hello hello hello world"] * 20, 300)
    assert "hello" in json.loads(vocab.read_text())
    tok = Tokenizer.gpt2(files=tmp_path / "pair", specials=(EOT, "hello"))
    hello = tok.special_ids["hello"]
    assert tok.encode("xhello") == tok.encode("x") + [hello]
    assert tok.encode(" hellohello") == tok.encode(" ") + [hello, hello]
    assert tok.decode(tok.encode("say hello!")) == "say hello!"
    trained = Tokenizer.train("bpe", one_shot(iter(["hello hello world"] * 20)), 300, (EOT, "hello"))
    assert trained.encode("hellohello") == [trained.special_ids["hello"]] * 2


@pytest.mark.parametrize("tok", kind_param(), indirect=True)
def test_cut_before_a_space_keeps_ids_when_cut_safe(tok: Tokenizer) -> None:
    assert tok.cut_safe
    for seed in range(3):
        text = tricky_text(seed, 120)
        whole = tok.encode(text)
        cuts = [
            i
            for i in range(1, len(text) - 1)
            if text[i] == " " and not text[i - 1].isspace() and not text[i + 1].isspace()
        ]
        assert len(cuts) > 20
        for i in cuts:
            assert tok.encode(text[:i]) + tok.encode(text[i:]) == whole, (text[:i], text[i:])


def test_cut_safe_follows_the_pre_tokenizer(tmp_path: Path) -> None:
    texts = ["hello world, hello there"] * 30
    # no pre-tokenizer: merges may span a space, so a cut changes ids
    hf = HFTokenizer(models.BPE())
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=60, show_progress=False))
    bare = Tokenizer(hf)
    assert not bare.cut_safe
    assert bare.encode("hello") + bare.encode(" world") != bare.encode("hello world")
    for pre, safe in [
        (pre_tokenizers.Whitespace(), True),
        (pre_tokenizers.WhitespaceSplit(), True),
        (pre_tokenizers.BertPreTokenizer(), True),
        (pre_tokenizers.Metaspace(), True),
        (pre_tokenizers.Sequence([pre_tokenizers.Digits(), pre_tokenizers.Whitespace()]), True),
        (pre_tokenizers.ByteLevel(use_regex=False), False),
        (pre_tokenizers.Punctuation(), False),
    ]:
        hf.pre_tokenizer = pre
        assert Tokenizer(hf).cut_safe is safe, pre
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.normalizer = normalizers.Lowercase()
    assert not Tokenizer(hf).cut_safe  # a normalizer may look across the cut
    spaced = Tokenizer.train("bpe", one_shot(corpus(20)), 300, (EOT, "<|a b|>"))
    assert not spaced.cut_safe  # a cut could fall inside the special token


# ----- byte-level BPE: the tiktoken engine must give HF's ids -----------------------------------------------------------
def test_byte_level_pair_matches_hf_tokenizers(tmp_path: Path) -> None:
    texts = [f"line {i}\n\n\n  indented {i % 7}\n\n" + TRICKY[i % len(TRICKY)] for i in range(200)]
    vocab, merges = hf_byte_level_pair(tmp_path / "pair", texts, 500)
    assert "Ċ Ċ" in merges.read_text(encoding="utf-8").splitlines()
    tok = Tokenizer.gpt2(files=tmp_path / "pair")
    ref = hf_reference(vocab, merges)
    assert (tok.kind, tok.engine) == ("bpe", "tiktoken")
    samples = TRICKY + [tricky_text(seed).replace(EOT, "") for seed in range(5)] + ["\n\n  c", "\n\n\n\n", " \n\n x\n"]
    for text in samples:
        assert tok.encode(text) == ref.encode(text).ids, text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(samples) == [e.ids for e in ref.encode_batch(samples)]
    assert tok.special_ids == {EOT: ref.get_vocab_size()}


def test_trained_bpe_uses_tiktoken_and_matches_hf(toks: dict[str, Tokenizer]) -> None:
    tok = toks["bpe"]
    assert (tok.kind, tok.engine, tok.vocab_size) == ("bpe", "tiktoken", 400)
    for text in TRICKY + SPECIAL_TEXTS + [tricky_text(7)]:
        assert tok.encode(text) == tok.hf.encode(text, add_special_tokens=False).ids


def test_tiktoken_engine_only_when_exact(tmp_path: Path) -> None:
    def pair(name: str, extra: list[str], merges: list[str]) -> Tokenizer:
        folder = tmp_path / name
        folder.mkdir()
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        vocab = {c: i for i, c in enumerate(alphabet + extra)}
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (folder / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
        return Tokenizer.gpt2(files=folder, specials=())

    good = pair("good", ["ab", "abc", "bc"], ["a b", "ab c", "b c"])
    assert good.engine == "tiktoken"
    assert good.encode("abc bc") == good.hf.encode("abc bc").ids
    # HF makes "bc" first and then has no merge "a bc"; tiktoken would join "a"+"bc" into "abc"
    odd = pair("odd", ["bc", "ab", "abc"], ["b c", "a b", "ab c"])
    assert odd.engine == "hf"
    assert odd.decode(odd.encode("abc")) == "abc"
    assert odd.encode("abc") == odd.hf.encode("abc").ids == [odd.hf.token_to_id("a"), odd.hf.token_to_id("bc")]
    # merge results whose ids do not rise in merge order
    assert pair("order", ["abc", "ab"], ["a b", "ab c"]).engine == "hf"
    # a prefix space or a normalizer changes the pieces tiktoken would see
    prefixed = Tokenizer(good.hf)
    assert prefixed.engine == "tiktoken"
    good.hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert Tokenizer(good.hf).engine == "hf"
    good.hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    good.hf.normalizer = normalizers.NFC()
    assert Tokenizer(good.hf).engine == "hf"


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "char"])
def test_transformers_loads_the_same_ids(kind: str, toks: dict[str, Tokenizer], tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok = toks[kind]
    tok.save(tmp_path / "tokenizer.json")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in TRICKY + SPECIAL_TEXTS + [tricky_text(3)]:
        ids = tok.encode(text)
        assert fast.encode(text, add_special_tokens=False) == ids
        assert fast.decode(ids) == text


# ----- GPT-2 -----------------------------------------------------------------------------------------------------------
@needs_gpt2
@needs_cache
def test_gpt2_matches_tiktoken_and_transformers(
    gpt2_dir: Path, tiktoken_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # read the cache, not an encoding loaded earlier
    reference = tiktoken.get_encoding("gpt2")
    tok = Tokenizer.gpt2(files=gpt2_dir)
    assert (tok.kind, tok.engine, tok.vocab_size, tok.eos_id) == ("gpt2", "tiktoken", 50257, 50256)
    tok.save(tmp_path / "tokenizer.json")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    texts = (
        TRICKY + SPECIAL_TEXTS + ["\n\n  c", "Hello world<|endoftext|>The end.\n"] + [tricky_text(s) for s in range(3)]
    )
    for text in texts:
        ids = reference.encode(text, allowed_special="all")
        assert tok.encode(text) == ids
        assert fast.encode(text, add_special_tokens=False) == ids
        assert tok.decode(ids) == text
    assert tok.encode("\n\n  c") == [628, 220, 269]


@needs_gpt2
@needs_cache
def test_gpt2_from_tiktoken_equals_gpt2_from_files(
    gpt2_dir: Path, tiktoken_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tiktoken_cache))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    downloaded = Tokenizer.gpt2(specials=(EOT, "<|pad|>"))
    offline = Tokenizer.gpt2(files=gpt2_dir, specials=("<|pad|>",))
    assert downloaded.fingerprint() == offline.fingerprint()  # merges recovered from tiktoken's ranks exactly
    assert (downloaded.kind, downloaded.engine, downloaded.special_ids) == (
        "gpt2",
        "tiktoken",
        {EOT: 50256, "<|pad|>": 50257},
    )


def test_gpt2_offline_without_cache_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    requests = pytest.importorskip("requests")

    def offline(*args: object, **kwargs: object) -> None:
        raise requests.ConnectionError("no network")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setattr(requests, "get", offline)
    with pytest.raises(GptlabError) as e:
        Tokenizer.gpt2()
    assert str(e.value) == (
        "could not download GPT-2's BPE from tiktoken (ConnectionError: no network) (set TIKTOKEN_CACHE_DIR to a folder "
        "holding tiktoken's cache, or give the folder of a GPT-2 vocab.json and merges.txt)"
    )


def test_gpt2_files_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(GptlabError) as e:
        Tokenizer.gpt2(files=tmp_path)
    assert str(e.value) == (
        f"no vocab.json + merges.txt in '{tmp_path}' (give the folder of a GPT-2 vocab.json and merges.txt "
        "(or <name>vocab.json + <name>merges.txt))"
    )
    with pytest.raises(GptlabError, match="is not a folder"):
        Tokenizer.gpt2(files=tmp_path / "missing")
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("")
    with pytest.raises(
        GptlabError, match=r"are unreadable: .*\(give the folder of a GPT-2 vocab.json and merges.txt\)$"
    ):
        Tokenizer.gpt2(files=tmp_path)


# ----- char and wordpiece ------------------------------------------------------------------------------------------------
def test_train_char_alias_and_unknown_characters() -> None:
    tok = Tokenizer.train_char(["hello", " world"])
    assert (tok.kind, tok.engine, tok.special_ids, tok.eos_id) == ("char", "hf", {}, None)
    assert tok.hf.get_vocab() == {c: i for i, c in enumerate(sorted(set("hello world")))}
    assert tok.decode(tok.encode("hello world")) == "hello world"
    with_eot = Tokenizer.train_char(["ab"], [EOT])
    assert with_eot.special_ids == {EOT: 2}
    assert with_eot.encode("a<|endoftext|>b") == [0, 2, 1]  # '<', '|' are unknown, but only inside the special
    with pytest.raises(GptlabError) as e:
        with_eot.encode("abc<")
    assert str(e.value) == (
        "text has characters outside the tokenizer's vocabulary: '<', 'c' "
        "(remove them from the prompt, or prepare data that contains them)"
    )
    with pytest.raises(GptlabError, match="outside the tokenizer's vocabulary: 'z'"):
        with_eot.encode_batch(["ab", "z"])


def test_wordpiece_vocabulary_never_needs_unk(toks: dict[str, Tokenizer]) -> None:
    tok = toks["wordpiece"]
    vocab = tok.hf.get_vocab()
    assert tok.vocab_size == len(vocab) <= 700  # the small corpus runs out of pieces to learn
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(vocab)  # every byte, word-initial or word-inner
    assert "[UNK]" not in vocab
    assert json.loads(tok.hf.to_str())["model"]["continuing_subword_prefix"] == ""
    # bytes never seen in training, and a word far longer than any piece, still round-trip (and fast)
    unseen = "Ωmega ∮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x7f " + "ab" * 20_000
    start = time.perf_counter()
    assert tok.decode(tok.encode(unseen)) == unseen
    assert time.perf_counter() - start < 2


def test_bpe_and_wordpiece_keep_the_asked_vocab_size() -> None:
    for kind, size in [("bpe", 300), ("wordpiece", 400), ("bpe", 257), ("wordpiece", 257)]:
        tok = Tokenizer.train(kind, one_shot(corpus(100)), size)
        assert tok.vocab_size == size, kind


def hf_trained(kind: str, texts: list[str], vocab_size: int, specials: list[str]) -> HFTokenizer:
    """Train with HF straight from the text, as its docs show: the reference for training from counted words."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if kind == "bpe":
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = byte_level
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
        )
    else:
        hf = HFTokenizer(
            models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="", max_input_chars_per_word=1_000_000)
        )
        cut = pre_tokenizers.Split(Regex(".{1,100}"), behavior="isolated")
        hf.pre_tokenizer = pre_tokenizers.Sequence([byte_level, cut])
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=alphabet,
            continuing_subword_prefix="",
            show_progress=False,
        )
    hf.train_from_iterator(texts, trainer)
    return hf


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_training_from_counted_words_equals_hf_on_the_text(kind: str) -> None:
    # long words (cut at 100 bytes for WordPiece), whitespace runs, unicode, frequent and one-off words
    rng = random.Random(5)
    texts = [*corpus(400), *(tricky_text(i).replace(EOT, "") for i in range(20))]
    texts += ["x" * 250 + " " + "é" * 130 + "  \n", "".join(rng.choice("abcdé ") for _ in range(3000))]
    ours = Tokenizer.train(kind, one_shot(iter(texts)), 700, (EOT, "<pad>"))
    theirs = json.loads(hf_trained(kind, texts, 700, [EOT, "<pad>"]).to_str())
    assert json.loads(ours.hf.to_str())["model"] == theirs["model"]
    text = tricky_text(3).replace(EOT, "")
    assert ours.encode(text) == [t for t in HFTokenizer.from_str(json.dumps(theirs)).encode(text).ids]


def test_count_words_splits_like_hf_byte_level() -> None:
    texts = [*TRICKY, tricky_text(1), tricky_text(2), "x" * 300]
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    theirs = Counter(word for text in texts for word, _ in pre.pre_tokenize_str(text))
    as_text = decoders.ByteLevel()  # HF's words are written in byte-level characters, ours as plain text
    assert Counter({as_text.decode([w]): n for w, n in theirs.items()}) == count_words(iter(texts))


def test_count_words_keeps_the_frequent_words_within_the_budget() -> None:
    rng = random.Random(0)

    def letters(n: int) -> str:  # n in base 26 as letters: a word that the pre-tokenizer keeps whole
        return "".join(chr(97 + n // 26**k % 26) for k in range(4))

    frequent = [f" common{letters(i)}" for i in range(20)]

    def texts() -> Iterator[str]:
        for block in range(200):  # each block: the frequent words 10 times each, and 100 words never seen again
            words = frequent * 10 + [f" rare{letters(block * 100 + j)}" for j in range(100)]
            rng.shuffle(words)
            yield "".join(words)

    full = count_words(texts(), max_words=10**9)
    assert len(full) == 20 + 200 * 100
    kept = count_words(texts(), max_words=500)
    assert len(kept) <= 500
    assert {w: kept[w] for w in frequent} == {w: 2000 for w in frequent}  # never dropped, so counted exactly
    assert all(kept[w] <= full[w] for w in kept)
    # a budget the corpus never reaches changes nothing
    assert count_words(texts(), max_words=len(full)) == full
    with pytest.raises(GptlabError) as e:
        count_words(iter(["a"]), max_words=0)
    assert str(e.value) == "max_words must be at least 1, got 0 (use at least 1; the default is 1,000,000)"
    # ties at the cut: the most counted stay, then the first seen; never everything
    assert count_words(["x y z w"] * 3 + ["p q r s t u"], max_words=5) == Counter({"x": 3, " y": 3})
    assert count_words("hello world", max_words=1) == Counter({"hello": 1})


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_training_with_a_small_word_budget(kind: str) -> None:
    texts = list(corpus(300)) + [" once" + "".join(chr(97 + i // 26**k % 26) for k in range(3)) for i in range(3000)]
    small = Tokenizer.train(kind, one_shot(iter(texts)), 400, (EOT,), max_words=1000)
    assert small.vocab_size == 400
    for text in [*TRICKY, tricky_text(4)]:
        assert small.decode(small.encode(text)) == text
    full = Tokenizer.train(kind, one_shot(iter(texts)), 400, (EOT,))
    assert small.fingerprint() != full.fingerprint()  # the one-off words were dropped, so the merges differ


# ----- files -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tok", kind_param(), indirect=True)
def test_save_load_keeps_everything(tok: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]
    back = Tokenizer.load(path)
    assert back.fingerprint() == tok.fingerprint()
    got = (back.kind, back.engine, back.vocab_size, back.special_ids, back.eos_id, back.cut_safe)
    assert got == (tok.kind, tok.engine, tok.vocab_size, tok.special_ids, tok.eos_id, tok.cut_safe)
    text = tricky_text(11)
    assert back.encode(text) == tok.encode(text)


def test_fingerprints_differ_between_tokenizers(toks: dict[str, Tokenizer]) -> None:
    prints = {tok.fingerprint() for tok in toks.values()}
    assert len(prints) == len(toks)
    assert all(len(p) == 64 for p in prints)


def test_decode_skips_ids_outside_the_vocabulary(toks: dict[str, Tokenizer]) -> None:
    for tok in toks.values():
        ids = tok.encode("hello king")
        assert tok.decode(ids + [tok.vocab_size + 5]) == "hello king"


# ----- errors ----------------------------------------------------------------------------------------------------------
def test_training_errors() -> None:
    def message(kind: str, texts: list[str], vocab_size: int = 1000, specials: tuple = (EOT,)) -> str:
        with pytest.raises(GptlabError) as e:
            Tokenizer.train(kind, iter(texts), vocab_size, specials)
        return str(e.value)

    assert message("words", ["a"]) == (
        "tokenizer kind 'words' is unknown (use one of char, bpe, wordpiece, gpt2, or a path to a tokenizer.json)"
    )
    assert message("gpt2", ["a"]) == "tokenizer kind 'gpt2' is pretrained, not trained (build it with Tokenizer.gpt2())"
    assert message("bpe", ["a"], 200) == (
        "vocab_size 200 is too small for a bpe tokenizer (use at least 257: the 256 bytes and 1 special token(s))"
    )
    assert message("wordpiece", ["a"], 257, (EOT, "<pad>")) == (
        "vocab_size 257 is too small for a wordpiece tokenizer (use at least 258: the 256 bytes and 2 special token(s))"
    )
    assert message("bpe", ["a"], 300, (EOT, EOT)) == (
        "special token '<|endoftext|>' is listed twice (list each special token once)"
    )
    assert message("char", ["a"], 0, (EOT, "")) == (
        "special token '' is empty or not text (give each special token some characters)"
    )
    for kind in ("char", "bpe", "wordpiece"):
        for texts in ([], [""]):
            assert message(kind, texts) == "the text to train the tokenizer on is empty (give it some text)"


def test_training_reads_the_stream_once_and_passes_its_errors() -> None:
    reads = []

    def stream() -> Iterator[str]:
        for i, text in enumerate(corpus(50)):
            reads.append(i)
            yield text
        raise GptlabError("source broke", "fix it")

    with pytest.raises(GptlabError, match="source broke"):
        Tokenizer.train("bpe", stream(), 300)
    assert reads == list(range(len(reads)))


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(GptlabError) as e:
        Tokenizer.load(tmp_path / "tokenizer.json")
    assert str(e.value) == f"tokenizer file '{tmp_path / 'tokenizer.json'}' not found (run `gptlab prepare` first)"
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": 1}')
    with pytest.raises(GptlabError) as e:
        Tokenizer.load(bad)
    assert str(e.value).startswith(f"tokenizer file '{bad}' is unreadable: ")
    assert str(e.value).endswith(" (prepare the data again)")


def test_old_merges_format_still_uses_tiktoken(toks: dict[str, Tokenizer], tmp_path: Path) -> None:
    spec = json.loads(toks["bpe"].hf.to_str())
    spec["model"]["merges"] = [" ".join(pair) for pair in spec["model"]["merges"]]  # tokenizers < 0.20 wrote "a b"
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    old = Tokenizer.load(tmp_path / "tokenizer.json")
    assert old.engine == "tiktoken"
    text = tricky_text(5)
    assert old.encode(text) == toks["bpe"].encode(text) == old.hf.encode(text, add_special_tokens=False).ids
