"""`gptlab data inspect`: what a prepared folder holds, and a few windows decoded as the model will read them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptlab.data.batches import PreparedData, load_prepared

SCAN_TOKENS = 1 << 22  # ids checked per shard (from its start) for out-of-vocabulary values


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:,.1f} MB"


def inspect_data(data_dir: str | Path, windows: int = 3, window_tokens: int = 64, seed: int = 0) -> str:
    """A report of shard stats, id checks and `windows` decoded random windows of the train split."""
    d = load_prepared(data_dir)  # checks meta.json, shard sizes and that tokenizer.json is the one used
    meta, tokenizer = d.meta, d.tokenizer()
    itemsize = np.dtype(meta["dtype"]).itemsize
    eot = meta.get("eot_id")
    lines = [
        f"data: {d.dir}",
        f"source: {meta['source']} ({meta.get('source_description', '')})",
        f"tokenizer: {meta['tokenizer']}, vocabulary {meta['vocab_size']:,}, ids stored as {meta['dtype']}"
        + (f", end of text = {eot}" if eot is not None else ""),
    ]
    if meta.get("format") == "task":  # drawn examples, split 70/20/10
        lines.append("task: " + ", ".join(f"{k}={v}" for k, v in meta["settings"].items()))
    elif meta["settings"].get("val_source"):  # a validation text of its own
        lines.append(f"split: val from {meta['settings']['val_source']}")
    else:
        lines.append(f"split: {meta['settings']['split']} (val fraction {meta['settings']['val_fraction']})")
    lines.append("")
    if d.examples is not None:
        return "\n".join(lines + _examples_report(d, windows, seed))
    lines += [
        f"{'shard':<18}{'tokens':>15}{'documents':>12}{'size':>12}{'max id':>9}",
    ]
    problems = []
    for split in ("train", "val"):
        for entry, shard in zip(meta["shards"][split], getattr(d, split)):
            top = int(shard[:SCAN_TOKENS].max())
            if top >= meta["vocab_size"]:
                problems.append(f"{entry['file']} holds id {top}, outside the vocabulary of {meta['vocab_size']}")
            lines.append(
                f"{entry['file']:<18}{entry['tokens']:>15,}{entry['documents']:>12,}"
                f"{_mb(entry['tokens'] * itemsize):>12}{top:>9}"
            )
        tokens = sum(e["tokens"] for e in meta["shards"][split])
        docs = sum(e["documents"] for e in meta["shards"][split])
        lines.append(f"{split + ' total':<18}{tokens:>15,}{docs:>12,}{_mb(tokens * itemsize):>12}")
    lines.append("")
    lines.extend(f"PROBLEM: {p}" for p in problems)
    rng = np.random.default_rng(seed)
    shards = [s for s in d.train if len(s) > 0]
    for k in range(windows):
        shard = shards[int(rng.integers(len(shards)))]
        n = min(window_tokens, len(shard))
        start = int(rng.integers(0, len(shard) - n + 1))
        ids = shard[start : start + n].tolist()
        lines.append(f"--- window {k + 1}: train tokens {start:,}..{start + n - 1:,} ---")
        lines.append(f"ids: {ids[:16]}{' ...' if n > 16 else ''}")
        lines.append(repr(tokenizer.decode(ids)))
    return "\n".join(lines)


def _examples_report(d: PreparedData, shown: int, seed: int) -> list[str]:
    """An sft folder: examples and tokens per split, the share the loss is on, a few examples split at the mask."""
    assert d.examples is not None
    lines = [f"{'split':<8}{'examples':>10}{'tokens':>12}{'response':>10}{'longest':>9}{'max id':>9}"]
    tokenizer, vocab = d.tokenizer(), d.meta["vocab_size"]
    for split, ex in d.examples.items():
        top, longest = int(ex.tokens.max()), int(np.diff(ex.offsets).max())
        share = float(ex.mask.mean())
        lines.append(f"{split:<8}{len(ex):>10,}{len(ex.tokens):>12,}{share:>10.0%}{longest:>9,}{top:>9}")
        if top >= vocab:
            lines.append(f"PROBLEM: {split} holds id {top}, outside the vocabulary of {vocab}")
    train = d.examples["train"]
    rng = np.random.default_rng(seed)
    for i in rng.choice(len(train), size=min(shown, len(train)), replace=False):
        start, end, cut = train.span(i)
        ids = train.tokens[start:end].tolist()
        lines.append(f"--- example {i}: {cut} prompt + {len(ids) - cut} response tokens (the loss is on these) ---")
        lines.append(f"prompt:   {tokenizer.decode(ids[:cut])!r}")
        lines.append(f"response: {tokenizer.decode(ids[cut:])!r}")
    return lines
