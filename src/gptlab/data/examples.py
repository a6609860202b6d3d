"""Supervised fine-tuning data: prompt/response examples with the loss on the response only.

`prepare_examples` reads a JSON-lines file of {prompt, response} objects, renders each prompt with the tokenizer's
chat template when it has one (a user turn, then the assistant's opening), and writes per split three flat arrays:
`{split}_tokens.bin` (prompt ids then response ids, end of text last), `{split}_mask.bin` (uint8, 1 on response
tokens: the ones the loss is taken on) and `{split}_offsets.bin` (int64, where each example starts; n + 1 values).
`batches.ExampleBatches` serves one example per row, right-padded, with targets -100 on the prompt and the padding.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from gptlab.chat import ChatTemplate, load_chat_template
from gptlab.config import DataConfig
from gptlab.data import shards
from gptlab.data.batches import EXAMPLE_FILES, file_sha256, load_prepared
from gptlab.data.shards import PrepareResult, token_dtype, write_atomic
from gptlab.data.sources import jsonl_objects, string_field
from gptlab.data.tokenizer_setup import make_tokenizer
from gptlab.errors import GptlabError
from gptlab.tokenizers import Tokenizer

# settings that decide the bytes written (the text ones about training a tokenizer, shards and chunks do not)
SFT_SETTINGS = (
    "source", "tokenizer", "special_tokens", "gpt2_files", "errors", "split", "val_fraction", "dtype", "format",
    "prompt_field", "response_field", "val_source",
)  # fmt: skip


def example_ids(tokenizer: Tokenizer, template: ChatTemplate | None, prompt: str, response: str) -> tuple[list, list]:
    """(prompt ids, response ids) of one example; the response ends with end-of-text so the model learns to stop.

    With a chat template the prompt is a user turn plus the assistant's opening, and the response is what the
    template writes for the assistant's turn after that (its end-of-turn marker included).
    """
    if template is None:
        prompt_text, response_text = prompt, response
    else:
        user = [{"role": "user", "content": prompt}]
        prompt_text = template.render(user)
        whole = template.render([*user, {"role": "assistant", "content": response}], add_generation_prompt=False)
        if not whole.startswith(prompt_text):  # e.g. a template that drops reasoning from earlier turns
            raise GptlabError(
                "the chat template renders a conversation that does not begin with its own generation prompt, so "
                "prompt and response cannot be told apart",
                "use a template whose add_generation_prompt output is a prefix of the whole conversation",
            )
        response_text = whole[len(prompt_text) :]
    # training data: special tokens' text (the template's, or the data's own) gets their ids, as in plain text data
    prompt_ids = tokenizer.encode(prompt_text, allow_special=True)
    response_ids = tokenizer.encode(response_text, allow_special=True)
    eos = tokenizer.eos_id
    if eos is not None and response_ids[-1:] != [eos]:
        response_ids.append(eos)
    return prompt_ids, response_ids


def prepare_examples(data: DataConfig, overwrite: bool = False, quiet: bool = False) -> PrepareResult:
    """Tokenize a prompt/response .jsonl into `data.dir` (skipped when already done with the same settings)."""
    out, path = Path(data.dir), Path(data.source)
    val_path = Path(data.val_source) if data.val_source else None
    for key, p in (("source", path), ("val_source", val_path)):
        if p is not None and (p.suffix != ".jsonl" or not p.is_file()):
            raise GptlabError(
                f"data.format=sft reads a .jsonl file of prompt/response objects; '{p}' is not one",
                f"set data.{key} to a .jsonl file with fields '{data.prompt_field}' and '{data.response_field}'",
            )
    if val_path is not None and val_path.resolve() == path.resolve():
        raise GptlabError(f"'{path}' is both data.source and data.val_source", "give a separate validation file")
    if data.tokenizer not in ("gpt2",) and not data.tokenizer.endswith(".json"):
        raise GptlabError(
            f"data.format=sft needs the tokenizer of the model being fine-tuned, not a new '{data.tokenizer}' one",
            "set data.tokenizer to its tokenizer.json (e.g. runs/NAME/tokenizer.json) or gpt2",
        )
    settings = {k: v for k, v in asdict(data).items() if k in SFT_SETTINGS}
    tokenizer = make_tokenizer(data.tokenizer, [], data.vocab_size, data.special_tokens, data.gpt2_files, quiet)
    template = load_chat_template(Path(data.tokenizer).parent, tokenizer) if data.tokenizer != "gpt2" else None
    fingerprint = file_sha256(path) + (":" + file_sha256(Path(data.tokenizer)) if data.tokenizer != "gpt2" else "")
    fingerprint += ":" + file_sha256(val_path) if val_path is not None else ""
    fingerprint += ":" + template.fingerprint() if template is not None else ""  # an edited template renders anew
    meta = None if overwrite else shards.read_meta(out / "meta.json")
    if meta is not None:
        old = meta.get("settings")  # prepared before val_source existed: it was null
        old = {"val_source": None, **old} if isinstance(old, dict) else old
        if old != settings or meta.get("source_fingerprint") != fingerprint:
            raise GptlabError(
                f"'{out}' already holds data prepared from another source or setting",
                "pass --overwrite, or set data.dir to a new folder",
            )
        if meta.get("complete"):
            load_prepared(out)
            return PrepareResult(out, meta, skipped=True)
    dtype = token_dtype(tokenizer.vocab_size, data.dtype)
    splits: dict[str, list[tuple[list, list]]] = {"train": [], "val": []}
    rows = [(path, n, r) for n, r, _ in jsonl_objects(path, data.errors) if r is not None]
    n_train = len(rows)
    if val_path is not None:  # every example of data.source is train, every one of data.val_source val
        rows += [(val_path, n, r) for n, r, _ in jsonl_objects(val_path, data.errors) if r is not None]
    n_val = max(1, round(len(rows) * data.val_fraction))
    for i, (file, lineno, row) in enumerate(rows):
        prompt = string_field(row, data.prompt_field, file, lineno, "data.prompt_field")
        response = string_field(row, data.response_field, file, lineno, "data.response_field")
        if val_path is not None:
            split = "val" if i >= n_train else "train"
        elif data.split == "tail":  # the last examples, as nanoGPT's tail of the text
            split = "val" if i >= len(rows) - n_val else "train"
        else:  # by a hash of the example: stable when examples are added or reordered
            in_val = zlib.crc32(f"{prompt}\0{response}".encode()) % 10_000 < data.val_fraction * 10_000
            split = "val" if in_val else "train"
        try:
            splits[split].append(example_ids(tokenizer, template, prompt, response))
        except jinja2.TemplateError as e:
            where = f"the chat template fails on '{file}' line {lineno}: {e}"
            raise GptlabError(where, "fix the template or the line") from e
    if len(splits["train"]) < 1 or len(splits["val"]) < 1:
        n_tr, n_va = len(splits["train"]), len(splits["val"])
        if val_path is not None:
            what = f"'{path}' gives {n_tr} train examples and '{val_path}' {n_va} val examples"
            raise GptlabError(what, "give more examples")
        raise GptlabError(
            f"'{path}' gives {n_tr} train and {n_va} val examples", "give more examples or another data.val_fraction"
        )
    meta = {
        "format_version": shards.FORMAT_VERSION, "format": "sft", "complete": True, "settings": settings,
        "source": data.source, "source_description": f"{len(rows):,} examples", "source_fingerprint": fingerprint,
        "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eos_id,
        "dtype": dtype.name, "chat_template": template is not None,
    }  # fmt: skip
    return PrepareResult(out, write_examples(out, tokenizer, splits, meta, template), skipped=False)


def write_examples(
    out: Path,
    tokenizer: Tokenizer,
    splits: dict[str, list[tuple[list, list]]],
    meta: dict[str, Any],
    template: ChatTemplate | None = None,
) -> dict[str, Any]:
    """Write example splits (prompt ids, response ids) as tokens/mask/offsets arrays with meta.json last; return it.

    `meta` names the folder's format and settings; the tokenizer hash, counts and file lists are added here.
    """
    out.mkdir(parents=True, exist_ok=True)
    shards.clear_prepared(out)  # meta.json first: nothing reads as complete while the files change
    tokenizer.save(out / "tokenizer.json")
    if template is not None:
        template.save(out)
    dtype = np.dtype(meta["dtype"])
    meta = {**meta, "tokenizer_sha256": file_sha256(out / "tokenizer.json"), "examples": {}, "shards": {}}
    for split, pairs in splits.items():
        arrays = _flatten(pairs, dtype)
        for name, a in zip(EXAMPLE_FILES, arrays):
            write_atomic(out / f"{split}_{name}.bin", a.tobytes())
        meta["examples"][split] = {"count": len(pairs), "tokens": len(arrays[0])}
        meta["shards"][split] = []
        meta[f"{split}_tokens"] = len(arrays[0])
    write_atomic(out / "meta.json", json.dumps(meta, indent=2).encode())
    return meta


def _flatten(pairs: list[tuple[list, list]], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.array([len(p) + len(r) for p, r in pairs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.fromiter((t for p, r in pairs for t in (*p, *r)), dtype=dtype, count=int(offsets[-1]))
    mask = np.fromiter((m for p, r in pairs for m in [0] * len(p) + [1] * len(r)), dtype=np.uint8, count=len(tokens))
    return tokens, mask, offsets
