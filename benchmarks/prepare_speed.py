"""Prepare speed and memory: gptlab's sharded prepare with GPT-2 BPE against bare tiktoken and HF tokenizers.

Corpora: Shakespeare's complete works (5 MB, ../shared/data) and a 1 GB file made from its words, a
fraction of them randomly mutated with a seeded generator so the text has millions of distinct words
(a real test of memory for tokenizer training).

Each round times, in an order that rotates, on the same file, each side starting as a fresh script
would (its tokenizer loaded inside the timed region):
- gptlab: `prepare(DataConfig(tokenizer="gpt2", workers=2, ...))`: stream, chunk at safe cuts, encode in
  2 worker processes, write shards and meta.json;
- tiktoken: `tiktoken.get_encoding("gpt2").encode_ordinary_batch(chunks, num_threads=2)` on 64 KB chunks,
  16 MB of text per call (all of it at once would not fit in memory for 1 GB), ids appended to a file;
- HF: `tokenizers.Tokenizer` (GPT-2's tokenizer.json) `encode_batch` on the same chunks, same file output.
MB/s is the file size over the wall time; the ratios are medians over rounds (interleaved, so a noisy
machine moves both sides alike). Peak RSS (the process tree summed, read from /proc 20 times a second) is
measured for `gptlab tokenizer train --kind bpe --vocab-size 8192` and `gptlab prepare` on the 1 GB file.
gptlab's ids are checked equal to tiktoken's on the 5 MB corpus.

GPT-2's files: ../shared/data/cs336_fixtures (vocab.json + merges.txt, and a tiktoken cache that
TIKTOKEN_CACHE_DIR points at, copied to the work folder so tiktoken loads gpt2 offline).

    python benchmarks/prepare_speed.py                       # as recorded in RESULTS.md
    python benchmarks/prepare_speed.py --big-mb 64 --rounds 1  # a quick look
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURES = SHARED / "cs336_fixtures"
CHUNK = 64 * 1024
CALL_CHARS = 16 << 20


def setup(work: Path) -> Path:
    """GPT-2 files and tiktoken cache copied into `work`; returns the vocab/merges folder."""
    cache = work / "tiktoken_cache"
    if not cache.is_dir():
        shutil.copytree(FIXTURES / "tiktoken_cache", cache)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    gpt2 = work / "gpt2"
    gpt2.mkdir(parents=True, exist_ok=True)
    fixtures = FIXTURES / "spring2024" / "tests" / "fixtures"
    shutil.copy(fixtures / "gpt2_vocab.json", gpt2 / "vocab.json")
    shutil.copy(fixtures / "gpt2_merges.txt", gpt2 / "merges.txt")
    return gpt2


def make_big(path: Path, megabytes: int, seed: int = 0, variants: int = 3_000_000) -> int:
    """Write ~`megabytes` MB of Shakespeare's words, 20% replaced by one of `variants` seeded mutations."""
    rng = np.random.default_rng(seed)
    words = np.array((SHARED / "shakespeare_complete.txt").read_text(encoding="utf-8").split(), dtype=object)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    base = words[rng.integers(0, len(words), size=variants)]
    pos = rng.random(variants)
    subs = rng.choice(letters, size=(variants, 2))
    mutated = np.empty(variants, dtype=object)
    for i, (w, p, (a, b)) in enumerate(zip(base, pos, subs)):
        k = int(p * len(w))
        mutated[i] = w[:k] + a + b + w[k + 1 :]  # replace one character by two: always a new spelling
    used = np.zeros(variants, dtype=bool)
    target, written, cursor = megabytes * 1_000_000, 0, 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            n = 200_000
            block = words[(cursor + np.arange(n)) % len(words)].copy()
            cursor += n
            swap = rng.random(n) < 0.2
            picks = rng.integers(0, variants, size=int(swap.sum()))
            used[picks] = True
            block[swap] = mutated[picks]
            seps = np.where(rng.random(n) < 0.08, "\n", " ").astype(object)
            text = "".join((block + seps).tolist())
            f.write(text)
            written += len(text.encode("utf-8"))
    tmp.replace(path)
    return int(used.sum()) + len(set(words.tolist()))


def chunks_of(text: str) -> list[str]:
    return [text[i : i + CHUNK] for i in range(0, len(text), CHUNK)]


def bare(path: Path, out: Path, encode_batch) -> None:
    """A hand-written prepare: read 16 MB, encode its 64 KB chunks in a batch call, append uint16 ids."""
    with open(path, encoding="utf-8") as f, open(out, "wb") as o:
        while text := f.read(CALL_CHARS):
            for ids in encode_batch(chunks_of(text)):
                o.write(np.asarray(ids, dtype=np.uint16).tobytes())


def run_gptlab(path: Path, out: Path, gpt2: Path) -> None:
    from gptlab.config import DataConfig
    from gptlab.data.shards import prepare

    data = DataConfig(source=str(path), dir=str(out), tokenizer="gpt2", gpt2_files=str(gpt2), workers=2)
    prepare(data, overwrite=True, quiet=True)


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd`; return (seconds, peak RSS in MB summed over its process tree)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peak, done = 0, threading.Event()

    def tree_rss() -> int:
        total, todo = 0, [proc.pid]
        while todo:
            pid = todo.pop()
            try:
                with open(f"/proc/{pid}/status") as f:
                    total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
            except (FileNotFoundError, StopIteration, ProcessLookupError):
                pass
        return total * 1024

    def poll() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss())
            time.sleep(0.05)

    t = threading.Thread(target=poll, daemon=True)
    t0 = time.perf_counter()
    t.start()
    rc = proc.wait()
    seconds = time.perf_counter() - t0
    done.set()
    t.join()
    if rc:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {rc}")
    return seconds, peak / 1e6


def check_ids(path: Path, work: Path, gpt2: Path) -> None:
    """gptlab's shards hold exactly tiktoken's ids of the train text and of the val text."""
    import tiktoken

    from gptlab.data.batches import load_prepared

    run_gptlab(path, work / "check", gpt2)
    d = load_prepared(work / "check")
    text = path.read_text(encoding="utf-8")
    cut = int(len(text.encode()) * 0.9)
    head = text.encode()[:cut].decode("utf-8", errors="ignore")
    enc = tiktoken.get_encoding("gpt2")
    ok_train = np.concatenate(d.train).tolist() == enc.encode_ordinary(head)
    ok_val = np.concatenate(d.val).tolist() == enc.encode_ordinary(text[len(head) :]) + [enc.eot_token]
    print(f"ids equal to tiktoken gpt2 on {path.name}: train {ok_train}, val {ok_val}")
    if not (ok_train and ok_val):
        raise SystemExit("gptlab's ids differ from tiktoken's")


def speed(path: Path, work: Path, gpt2: Path, rounds: int) -> dict[str, float]:
    import tiktoken
    from tokenizers import Tokenizer as HFTokenizer

    import gptlab.tokenizers
    from gptlab.tokenizers import Tokenizer

    Tokenizer.gpt2(files=gpt2).save(work / "gpt2.json")

    # every side starts as a fresh script would: loading its tokenizer is part of its time
    def with_tiktoken() -> None:
        tiktoken.registry.ENCODINGS.clear()
        enc = tiktoken.get_encoding("gpt2")
        bare(path, work / "out-tiktoken.bin", lambda c: enc.encode_ordinary_batch(c, num_threads=2))

    def with_hf() -> None:
        hf = HFTokenizer.from_file(str(work / "gpt2.json"))
        bare(path, work / "out-hf.bin", lambda c: [e.ids for e in hf.encode_batch(c)])

    def with_gptlab() -> None:
        gptlab.tokenizers._ENCODINGS.clear()
        run_gptlab(path, work / "out-gptlab", gpt2)

    sides = {"gptlab": with_gptlab, "tiktoken": with_tiktoken, "hf": with_hf}
    mb = path.stat().st_size / 1e6
    times: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    for r in range(rounds):
        for name in names[r % 3 :] + names[: r % 3]:  # rotate who goes first
            t0 = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - t0)
        print(f"  round {r + 1}: " + ", ".join(f"{k} {mb / v[-1]:.2f} MB/s" for k, v in times.items()), flush=True)
    ratio_tt = statistics.median(t / g for t, g in zip(times["tiktoken"], times["gptlab"]))
    ratio_hf = statistics.median(h / g for h, g in zip(times["hf"], times["gptlab"]))
    result = {f"{k} MB/s": mb / statistics.median(v) for k, v in times.items()}
    result.update({"gptlab/tiktoken": ratio_tt, "gptlab/hf": ratio_hf})
    print(f"{path.name} ({mb:.0f} MB): " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()), flush=True)
    return result


def budget_effect(big: Path, megabytes: int) -> None:
    """What the default word budget changes: bpe 8192 on the first `megabytes` of `big`, with it and without."""
    from gptlab.tokenizers import MAX_WORDS, Tokenizer, count_words

    def pieces() -> Iterator[str]:
        with open(big, encoding="utf-8") as f:
            for _ in range(megabytes):
                yield f.read(1 << 20)

    distinct = len(count_words(pieces(), max_words=10**9))
    toks = {}
    for name, budget in [("budget", MAX_WORDS), ("none", 10**9)]:
        t0 = time.perf_counter()
        toks[name] = Tokenizer.train("bpe", pieces(), 8192, max_words=budget)
        print(f"  bpe 8192, max_words {budget:,}: {time.perf_counter() - t0:.0f} s", flush=True)
    vocabs = [set(t.hf.get_vocab()) for t in toks.values()]
    text = (SHARED / "shakespeare_complete.txt").read_text()
    per_byte = {k: len(t.encode(text)) / len(text.encode()) for k, t in toks.items()}
    print(
        f"word budget on the first {megabytes} MB of {big.name} ({distinct:,} distinct words): "
        f"{len(vocabs[0] & vocabs[1]):,} of 8,192 tokens shared; tokens per byte of "
        f"shakespeare_complete.txt {per_byte['budget']:.4f} with the budget, {per_byte['none']:.4f} without",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/gptlab-prepare-bench", help="scratch folder (the 1 GB file lives here)")
    parser.add_argument("--big-mb", type=int, default=1000, help="size of the mutated corpus; 0 skips it")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--budget-mb",
        type=int,
        default=0,
        help="also compare tokenizer training with and without the word budget on the first N MB of the mutated corpus",
    )
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    gpt2 = setup(work)
    small = SHARED / "shakespeare_complete.txt"
    print(f"machine: {os.cpu_count()} CPUs; python {sys.version.split()[0]}", flush=True)
    check_ids(small, work, gpt2)
    speed(small, work, gpt2, args.rounds)
    if not args.big_mb:
        return
    big = work / f"mutated_{args.big_mb}mb.txt"
    if not big.is_file():
        t0 = time.perf_counter()
        distinct = make_big(big, args.big_mb)
        print(f"made {big} in {time.perf_counter() - t0:.0f} s: at least {distinct:,} distinct words", flush=True)
    speed(big, work, gpt2, args.rounds)
    gptlab = str(Path(sys.executable).with_name("gptlab"))
    train = [gptlab, "tokenizer", "train", "--kind", "bpe", "--vocab-size", "8192", "--special", "<|endoftext|>"]
    seconds, rss = peak_rss([*train, "--out", str(work / "bpe"), "--quiet", str(big)])
    print(f"tokenizer train (bpe 8192) on {big.name}: {seconds:.0f} s, peak RSS {rss:,.0f} MB", flush=True)
    if args.budget_mb:
        budget_effect(big, args.budget_mb)
    prep = [gptlab, "prepare", f"data.source={big}", f"data.dir={work / 'rss'}", "data.tokenizer=gpt2"]
    seconds, rss = peak_rss([*prep, f"data.gpt2_files={gpt2}", "--workers", "2", "--overwrite", "--quiet"])
    print(f"prepare (gpt2, 2 workers) on {big.name}: {seconds:.0f} s, peak RSS {rss:,.0f} MB", flush=True)


if __name__ == "__main__":
    main()
