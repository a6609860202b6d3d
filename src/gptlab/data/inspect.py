"""`gptlab data inspect`: what a prepared folder holds, and a few windows decoded as the model will read them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gptlab.data.batches import load_prepared

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
        f"split: {meta['settings']['split']} (val fraction {meta['settings']['val_fraction']})",
        "",
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
