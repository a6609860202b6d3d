"""Batches from prepared token files: the batch of step s is a pure function of (seed, epoch, s).

Because no sampler state is carried from step to step, resuming at step s, running on another
number of ranks (rank r takes rows r::world) and replaying a run all give the same batches.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.errors import GptlabError
from gptlab.tokenizers import Tokenizer

IGNORE_INDEX = -100  # targets with this value are excluded from the loss
EXAMPLE_FILES = ("tokens", "mask", "offsets")  # the arrays of each split of an sft folder (data/examples.py)


@dataclass
class Examples:
    """One split's examples: token ids, the response mask and where each example starts."""

    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def span(self, i: int) -> tuple[int, int, int]:
        """Where example i starts and ends in `tokens`, and its prompt's length (up to the first masked token)."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        mask = self.mask[start:end]
        return start, end, int(np.argmax(mask)) if mask.any() else end - start


@dataclass
class PreparedData:
    """A prepared data folder: memory-mapped shards of each split, the tokenizer and meta.json."""

    dir: Path
    meta: dict[str, Any]
    train: list[np.ndarray]
    val: list[np.ndarray]
    examples: dict[str, Examples] | None = None  # an sft or task folder's examples per split (no shards then)

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / "tokenizer.json"

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_path)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes: how meta.json names the tokenizer its shards were written with."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_prepared(data_dir: str | Path) -> PreparedData:
    """Open a prepared data folder without reading the tokens into memory; check it is whole and consistent."""
    d = Path(data_dir)
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise GptlabError(f"no prepared data in '{d}' (meta.json missing)", f"run `gptlab prepare` with data.dir={d}")
    again = "run `gptlab prepare --overwrite` again"
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != 2:
            raise GptlabError(f"'{d}' was prepared by an older gptlab", again)
        if not meta["complete"]:
            raise GptlabError(
                f"the prepare of '{d}' did not finish", "run the same `gptlab prepare` again to resume it"
            )
        tokenizer_path = d / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise GptlabError(f"'{tokenizer_path}' is missing", again)
        if file_sha256(tokenizer_path) != meta["tokenizer_sha256"]:
            raise GptlabError(
                f"'{tokenizer_path}' does not match the tokenizer the shards in '{d}' were written with",
                f"put back the original tokenizer.json, or {again}",
            )
        dtype = np.dtype(meta["dtype"])
        splits: dict[str, list[np.ndarray]] = {}
        for split in ("train", "val"):
            splits[split] = []
            for entry in meta["shards"][split]:
                path = d / entry["file"]
                if not path.is_file() or path.stat().st_size != entry["tokens"] * dtype.itemsize:
                    raise GptlabError(f"shard '{path}' is missing or has the wrong size", again)
                splits[split].append(np.memmap(path, dtype=dtype, mode="r"))
        # sft and task folders hold examples (task folders a test split too) instead of shards
        with_examples = meta.get("format") in ("sft", "task")
        examples = {s: load_examples(d, meta, s) for s in meta["examples"]} if with_examples else None
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise GptlabError(f"'{meta_path}' is corrupted: {e!r}", again) from e
    return PreparedData(d, meta, splits["train"], splits["val"], examples)


def load_examples(d: Path, meta: dict[str, Any], split: str) -> Examples:
    """One split of a prepared sft folder, memory-mapped and checked against meta.json."""
    info = meta["examples"][split]
    dtypes = {"tokens": np.dtype(meta["dtype"]), "mask": np.dtype(np.uint8), "offsets": np.dtype(np.int64)}
    sizes = {"tokens": info["tokens"], "mask": info["tokens"], "offsets": info["count"] + 1}
    arrays = {}
    for name in EXAMPLE_FILES:
        path = d / f"{split}_{name}.bin"
        if not path.is_file() or path.stat().st_size != sizes[name] * dtypes[name].itemsize:
            raise GptlabError(f"'{path}' is missing or has the wrong size", "run `gptlab prepare --overwrite` again")
        arrays[name] = np.memmap(path, dtype=dtypes[name], mode="r")
    return Examples(**arrays)


class _StepItems:
    """What `Batches` and `ExampleBatches` share: the items of step s's global batch, a pure function of (seed, s) in
    random mode (so the epoch length, eval_interval, can change) and of (seed, epoch, s) in epoch mode."""

    seed: int
    batch_size: int
    mode: str
    steps_per_epoch: int
    _perm_epoch: int = -1
    _perm: np.ndarray = np.empty(0, dtype=np.int64)

    def _items(self, step: int, n: int) -> np.ndarray:
        """Indices in [0, n) of the whole global batch of `step` (all ranks)."""
        if self.mode == "random":
            return np.random.default_rng([self.seed, step]).integers(0, n, size=self.batch_size)
        epoch, s = divmod(step, self.steps_per_epoch)
        if self._perm_epoch != epoch:
            self._perm, self._perm_epoch = np.random.default_rng([self.seed, epoch]).permutation(n), epoch
        return self._perm[s * self.batch_size : (s + 1) * self.batch_size]


class ExampleBatches(_StepItems):
    """One example per row, cut to the context and right-padded; the batch of step s is a pure function of (seed, s).

    Targets are the next token where that token is part of the response, and IGNORE_INDEX elsewhere (the prompt,
    the padding), so the loss is taken on responses only. An example longer than the context loses the start of a
    long prompt (keeping at least the last half-context of it), then the end of its response, so that a response
    is never cut away whole. Rank r takes rows r::world, as `Batches`.
    """

    def __init__(
        self,
        examples: Examples,
        block_size: int,
        batch_size: int,
        mode: str,
        seed: int,
        steps_per_epoch: int | None = None,
        rank: int = 0,
        world: int = 1,
        split: str = "train",
        pad_id: int = 0,
    ) -> None:
        n = len(examples)
        if batch_size % world:
            raise GptlabError(f"batch size {batch_size} is not divisible by {world} ranks", "change train.batch_size")
        if mode == "epoch" and n < batch_size:
            raise GptlabError(
                f"the {split} split has {n} examples, fewer than one batch", "lower train.batch_size or add examples"
            )
        self.examples, self.block_size, self.batch_size = examples, block_size, batch_size
        self.mode, self.seed, self.rank, self.world, self.pad_id = mode, seed, rank, world, pad_id
        self.steps_per_epoch = n // batch_size if mode == "epoch" else steps_per_epoch or 1
        lengths = np.diff(examples.offsets)
        self.truncated = int((lengths > block_size + 1).sum())  # examples longer than the context are cut

    def indices(self, step: int) -> np.ndarray:
        """The examples of the whole global batch of `step` (all ranks)."""
        return self._items(step, len(self.examples))

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's rows of the batch of `step`: inputs and targets (B, block_size), int64."""
        rows = self.indices(step)[self.rank :: self.world]
        T = self.block_size
        x = np.full((len(rows), T), self.pad_id, dtype=np.int64)
        y = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)
        ex = self.examples
        for b, i in enumerate(rows):
            start, end, prompt = ex.span(i)
            if end - start > T + 1:  # too long: drop the prompt's beginning (down to half the context), then the end
                start += min(max(0, prompt - T // 2), end - start - (T + 1))
                end = start + T + 1
            ids, mask = ex.tokens[start:end].astype(np.int64), ex.mask[start:end]
            x[b, : len(ids) - 1] = ids[:-1]
            y[b, : len(ids) - 1] = np.where(mask[1:] == 1, ids[1:], IGNORE_INDEX)
        return x, y


class Batches(_StepItems):
    """Windows of `block_size + 1` tokens from one or more shards, in random or epoch order, split across ranks.

    Positions are offsets into the shards laid end to end; a window never crosses a shard's end.
    """

    def __init__(
        self,
        shards: np.ndarray | list[np.ndarray],
        block_size: int,
        batch_size: int,
        mode: str,
        seed: int,
        steps_per_epoch: int | None = None,
        rank: int = 0,
        world: int = 1,
        split: str = "train",
    ) -> None:
        shards = [shards] if isinstance(shards, np.ndarray) else list(shards)
        lengths = np.array([len(s) for s in shards], dtype=np.int64)
        total = int(lengths.sum())
        if not len(shards) or lengths.max() < block_size + 1:
            raise GptlabError(
                f"the {split} split has {total} tokens, fewer than the context of {block_size} + 1"
                + (" in any one shard" if len(shards) > 1 else ""),
                "lower model.block_size or give more text"
                + (" or larger data.shard_tokens" if len(shards) > 1 else ""),
            )
        if batch_size % world:
            raise GptlabError(f"batch size {batch_size} is not divisible by {world} ranks", "change train.batch_size")
        self.shards, self.block_size, self.batch_size = shards, block_size, batch_size
        self.mode, self.seed, self.rank, self.world = mode, seed, rank, world
        self.bases = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # where each shard starts, end to end
        # random windows may start anywhere a whole window fits; epoch blocks are non-overlapping inputs
        # whose target may reach one token further
        self.window_counts = np.maximum(lengths - block_size, 0)
        self.block_counts = np.maximum(lengths - 1, 0) // block_size
        self.n_blocks = int(self.block_counts.sum())
        if mode == "epoch":
            if self.n_blocks < batch_size:
                raise GptlabError(
                    f"the {split} split has {self.n_blocks} blocks of {block_size} tokens, fewer than one batch",
                    "lower train.batch_size or model.block_size, or give more text",
                )
            self.steps_per_epoch = self.n_blocks // batch_size  # the last partial batch is dropped
        else:
            self.steps_per_epoch = steps_per_epoch or 1

    @staticmethod
    def _locate(index: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global item index -> (shard, item within that shard), for items counted per shard."""
        ends = np.cumsum(counts)
        shard = np.searchsorted(ends, index, side="right")
        return shard, index - (ends[shard] - counts[shard])

    def starts(self, step: int) -> np.ndarray:
        """Start positions (shards end to end) of the whole global batch of `step` (all ranks)."""
        if self.mode == "random":  # any window start
            shard, offset = self._locate(self._items(step, int(self.window_counts.sum())), self.window_counts)
            return self.bases[shard] + offset
        shard, block = self._locate(self._items(step, self.n_blocks), self.block_counts)
        return self.bases[shard] + block * self.block_size

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's rows (r::world) of the batch of `step`: inputs and next-token targets, int64."""
        starts = self.starts(step)[self.rank :: self.world]
        shard = np.searchsorted(self.bases, starts, side="right") - 1
        offsets = starts - self.bases[shard]
        n = self.block_size + 1
        windows = np.stack([self.shards[k][o : o + n] for k, o in zip(shard, offsets)]).astype(np.int64)
        return windows[:, :-1], windows[:, 1:]


def prefetch(
    batches: Batches, start: int, stop: int, transform: Callable[[np.ndarray], Any] = lambda a: a, depth: int = 2
) -> Iterator[tuple[Any, Any]]:
    """Batches of steps start..stop-1, read `depth` steps ahead in a background thread.

    Reading a batch touches the memory-mapped shards (page faults, disk); doing it while the model
    computes hides that cost. `transform` runs in the thread too (e.g. pinning memory for CUDA).
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stopped = threading.Event()

    def put(item: Any) -> bool:
        while not stopped.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for step in range(start, stop):
                x, y = batches.batch(step)
                if not put((transform(x), transform(y))):
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(e)

    thread = threading.Thread(target=work, name="gptlab-prefetch", daemon=True)
    thread.start()
    try:
        for _ in range(start, stop):
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stopped.set()
        thread.join()
