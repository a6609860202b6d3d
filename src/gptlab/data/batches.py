"""Batches from prepared token files: the batch of step s is a pure function of (seed, epoch, s).

Because no sampler state is carried from step to step, resuming at step s, running on another
number of ranks (rank r takes rows r::world) and replaying a run all give the same batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.errors import GptlabError
from gptlab.tokenizers import Tokenizer

IGNORE_INDEX = -100  # targets with this value are excluded from the loss


@dataclass
class PreparedData:
    """A prepared data folder: memory-mapped splits, the tokenizer and meta.json."""

    dir: Path
    meta: dict[str, Any]
    train: np.ndarray
    val: np.ndarray

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / "tokenizer.json"

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_path)


def load_prepared(data_dir: str | Path) -> PreparedData:
    """Open a prepared data folder without reading the tokens into memory."""
    d = Path(data_dir)
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        raise GptlabError(f"no prepared data in '{d}' (meta.json missing)", f"run `gptlab prepare` with data.dir={d}")
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        splits = {}
        for split in ("train", "val"):
            path = d / f"{split}.bin"
            expected = meta[f"{split}_tokens"]
            if not path.is_file() or path.stat().st_size != expected * dtype.itemsize:
                raise GptlabError(f"'{path}' is missing or truncated", "run `gptlab prepare --overwrite` again")
            splits[split] = np.memmap(path, dtype=dtype, mode="r")
    except (KeyError, ValueError, TypeError) as e:
        raise GptlabError(f"'{meta_path}' is corrupted: {e}", "run `gptlab prepare --overwrite` again") from e
    return PreparedData(d, meta, splits["train"], splits["val"])


class Batches:
    """Windows of `block_size + 1` tokens, in random or epoch order, split across ranks."""

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        mode: str,
        seed: int,
        steps_per_epoch: int | None = None,
        rank: int = 0,
        world: int = 1,
        split: str = "train",
    ) -> None:
        if len(tokens) < block_size + 1:
            raise GptlabError(
                f"the {split} split has {len(tokens)} tokens, fewer than the context of {block_size} + 1",
                "lower model.block_size or give more text",
            )
        if batch_size % world:
            raise GptlabError(f"batch size {batch_size} is not divisible by {world} ranks", "change train.batch_size")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.mode, self.seed, self.rank, self.world = mode, seed, rank, world
        self.n_blocks = (len(tokens) - 1) // block_size  # non-overlapping inputs; the target may reach one further
        if mode == "epoch":
            if self.n_blocks < batch_size:
                raise GptlabError(
                    f"the {split} split has {self.n_blocks} blocks of {block_size} tokens, fewer than one batch",
                    "lower train.batch_size or model.block_size, or give more text",
                )
            self.steps_per_epoch = self.n_blocks // batch_size  # the last partial batch is dropped
        else:
            self.steps_per_epoch = steps_per_epoch or 1
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def starts(self, step: int) -> np.ndarray:
        """Start offsets of the whole global batch of `step` (all ranks)."""
        if self.mode == "random":  # seeded by the step alone, so the epoch length (eval_interval) can change
            rng = np.random.default_rng([self.seed, step])
            return rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        epoch, s = divmod(step, self.steps_per_epoch)
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            self._perm_epoch = epoch
        return self._perm[s * self.batch_size : (s + 1) * self.batch_size] * self.block_size

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's rows (r::world) of the batch of `step`: inputs and next-token targets, int64."""
        starts = self.starts(step)[self.rank :: self.world]
        windows = np.stack([self.tokens[i : i + self.block_size + 1] for i in starts]).astype(np.int64)
        return windows[:, :-1], windows[:, 1:]
