"""One tokenizer interface over Hugging Face `tokenizers`, stored as a standard `tokenizer.json`."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from gptlab.errors import GptlabError

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<EOS>")


class Tokenizer:
    """Text <-> token ids, with the vocabulary size and special ids a model needs."""

    def __init__(self, hf: HFTokenizer) -> None:
        self.hf = hf
        vocab = hf.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values()) + 1 if vocab else 0
        self.special_ids: dict[str, int] = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        self.eos_id: int | None = next((self.special_ids[t] for t in EOS_CANDIDATES if t in self.special_ids), None)
        # a character tokenizer silently drops unseen characters; we remember its alphabet to refuse them
        model = json.loads(hf.to_str())["model"]
        is_char = model["type"] == "BPE" and not model.get("merges")
        self.kind = "char" if is_char else model["type"].lower()
        self._alphabet = set(model["vocab"]) if is_char else None

    @classmethod
    def train_char(cls, texts: Iterable[str], specials: Iterable[str] = ()) -> Tokenizer:
        """Build a character tokenizer whose vocabulary is the sorted characters of `texts`."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        specials = list(specials)
        vocab = {c: i for i, c in enumerate(sorted(chars - set(specials)))}
        # BPE without merges is a pure character lookup, and transformers loads it as a fast tokenizer
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        hf.decoder = decoders.Fuse()
        if specials:
            hf.add_special_tokens(specials)
        return cls(hf)

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

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` (atomically)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        self.hf.save(str(tmp))
        tmp.replace(path)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; characters outside a character vocabulary are a user error."""
        if self._alphabet is not None:
            unknown = set(text) - self._alphabet - set(self.special_ids)
            if unknown:
                shown = ", ".join(repr(c) for c in sorted(unknown)[:5])
                raise GptlabError(
                    f"text has characters outside the tokenizer's vocabulary: {shown}",
                    "remove them from the prompt, or prepare data that contains them",
                )
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the Rust backend."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids."""
        return self.hf.decode(list(ids), skip_special_tokens=False)
