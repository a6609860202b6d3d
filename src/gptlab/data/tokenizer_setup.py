"""Get the tokenizer a prepare asks for: train it on the streamed source, build GPT-2's, or load a file."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from gptlab.config import DataConfig
from gptlab.data.sources import Source, open_source
from gptlab.errors import GptlabError
from gptlab.progress import bytes_bar
from gptlab.tokenizers import KINDS, MAX_WORDS, Tokenizer


def _streamed_texts(sources: Sequence[Source], quiet: bool) -> Iterator[str]:
    """The sources' text pieces, one at a time, with a MB/s bar: training never holds the corpus."""
    sizes = [s.total_bytes() for s in sources]
    total = None if None in sizes else sum(sizes)
    with bytes_bar() as bar:
        task = bar.add_task("train tokenizer", total=total, info="", visible=not quiet)
        for source in sources:
            for piece in source.pieces():
                yield piece.text
                bar.advance(task, piece.nbytes)


def make_tokenizer(
    kind: str,
    sources: Sequence[Source],
    vocab_size: int,
    specials: Sequence[str],
    gpt2_files: str | None = None,
    quiet: bool = False,
    max_words: int = MAX_WORDS,
) -> Tokenizer:
    """Load a tokenizer.json, build GPT-2's BPE, or train a char/bpe/wordpiece tokenizer on the sources."""
    specials = list(specials)
    if kind.endswith(".json"):
        if not Path(kind).is_file():
            raise GptlabError(
                f"tokenizer file '{kind}' not found", "check data.tokenizer, or make one with `gptlab tokenizer train`"
            )
        tokenizer = Tokenizer.load(kind)
        own_eos = tokenizer.eos_token
        if specials and own_eos is not None and specials[0] not in tokenizer.special_ids:
            # the first special ends documents: never a new one beside the tokenizer's own (a fine-tune's model
            # would have to learn to stop all over again)
            raise GptlabError(
                f"tokenizer '{kind}' ends text with '{own_eos}', not '{specials[0]}'",
                f"list its own first: data.special_tokens=[{own_eos}] (more specials after it are added)",
            )
        # specials it lacks are added (new ids after its own): a fine-tuned model grows its vocabulary for them
        tokenizer = tokenizer.with_specials(specials)
        return tokenizer
    if kind == "gpt2":
        return Tokenizer.gpt2(files=gpt2_files, specials=specials)
    return Tokenizer.train(kind, _streamed_texts(sources, quiet), vocab_size, specials, max_words)


def build_tokenizer(
    data: DataConfig, source: Source, quiet: bool = False, val_source: Source | None = None
) -> Tokenizer:
    """The tokenizer `data` asks for, trained on `source` (the train text) when it has to be.

    A char tokenizer's alphabet comes from `val_source` too: a character it lacked could not be encoded at all
    (bpe and wordpiece start from every byte, so they never need the validation text).
    """
    sources = [source] + ([val_source] if val_source is not None and data.tokenizer == "char" else [])
    return make_tokenizer(
        data.tokenizer, sources, data.vocab_size, data.special_tokens, data.gpt2_files, quiet, data.max_words
    )


def train_tokenizer(
    kind: str,
    paths: Sequence[str],
    out_dir: str | Path,
    vocab_size: int = 8192,
    specials: Sequence[str] = ("<|endoftext|>",),
    text_field: str = "text",
    errors: str = "strict",
    quiet: bool = False,
    max_words: int = MAX_WORDS,
) -> Path:
    """Train a tokenizer on text files (for gpt2: build it) and write `out_dir/tokenizer.json`."""
    if kind not in KINDS:
        raise GptlabError(f"tokenizer kind '{kind}' is unknown", "use one of " + ", ".join(KINDS))
    if not paths and kind != "gpt2":
        raise GptlabError("no text to train the tokenizer on", "give one or more files, folders or globs")
    if kind == "gpt2":  # nothing to train: PATH, if given, is the folder of a GPT-2 vocab.json + merges.txt
        tokenizer = Tokenizer.gpt2(files=paths[0] if paths else None, specials=list(specials))
    else:
        sources = [open_source(p, text_field=text_field, errors=errors) for p in paths]
        tokenizer = make_tokenizer(kind, sources, vocab_size, specials, quiet=quiet, max_words=max_words)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GptlabError(f"--out '{out}' is a file", "give a folder")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / "tokenizer.json")
    return out / "tokenizer.json"
