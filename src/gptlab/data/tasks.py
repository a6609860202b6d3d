"""Synthetic tasks scored by exact match: the adder of story 1 and a sort task.

An example is `<BOS>` + prompt + answer + `<EOS>` over a small character vocabulary, e.g. `<BOS>13+48=061<EOS>`
(operands zero-padded to `digits`, the sum to `digits + 1`, so every example has the same length). Distinct
examples are drawn with the task's seed (all of them, shuffled, when there are no more than asked for) and split
70/20/10 into train / val / test, so no example is in two splits. They are written like sft data (tokens, a mask
that is 1 on the answer and `<EOS>`, offsets), so the loss is taken on the answer only.
"""

from __future__ import annotations

import functools
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptlab.config import MAX_SORT_VALUES, TaskConfig
from gptlab.data import shards
from gptlab.data.examples import write_examples
from gptlab.data.shards import PrepareResult, token_dtype
from gptlab.errors import GptlabError
from gptlab.tokenizers import Tokenizer

BOS, EOS = "<BOS>", "<EOS>"  # EOS first: the first special ends an example (the tokenizer's eos_id)
# the sort task's symbols, in order: 0-9, a-z, A-Z, then letters of Latin-1 (À-ÿ without × and ÷) and Latin
# Extended-A (Ā-ſ): single code points a character tokenizer keeps as they are, none of them `=` or a special's
SYMBOLS = (
    string.digits + string.ascii_lowercase + string.ascii_uppercase
    + "".join(chr(c) for c in range(0xC0, 0x180) if c not in (0xD7, 0xF7))
)  # fmt: skip
assert len(SYMBOLS) == MAX_SORT_VALUES  # task.values' bound in config.py
SPLIT_FRACTIONS = (("train", 0.7), ("val", 0.2), ("test", 0.1))
TASK_SETTINGS = ("name", "digits", "length", "values", "examples", "seed")  # what may decide the examples
USED = {"adder": ("digits",), "sort": ("length", "values")}  # of those, what each task's own shape depends on
LISTED = 4  # spaces of at most LISTED x the examples asked for are listed whole and shuffled; larger ones sampled


@dataclass(frozen=True)
class Task:
    """A task: how an example is written from its `width` random symbols of `base` values, and its vocabulary."""

    name: str
    base: int  # values of each random symbol
    width: int  # random symbols per example
    alphabet: str  # the characters prompts and answers are written with

    def write(self, row: np.ndarray) -> tuple[str, str]:
        """The (prompt, answer) text of one example from its random symbols."""
        raise NotImplementedError

    def tokenizer(self) -> Tokenizer:
        """A character tokenizer over the task's alphabet with <EOS> and <BOS>."""
        return Tokenizer.train_char([self.alphabet], specials=[EOS, BOS])

    def draw(self, count: int, seed: int) -> np.ndarray:
        """`count` distinct rows of random symbols (fewer when fewer exist), in a seeded random order."""
        rng = np.random.default_rng(seed)
        space = self.base**self.width
        if space <= LISTED * count:  # small: a shuffled list of all of them, cut to the count
            index = rng.permutation(space)[:count]
            return np.stack([(index // self.base**k) % self.base for k in reversed(range(self.width))], axis=1)
        rows: dict[bytes, np.ndarray] = {}
        while len(rows) < count:  # large: random rows, duplicates dropped (rare: the space is 4x the count or more)
            for row in rng.integers(0, self.base, size=(count - len(rows), self.width)):
                rows.setdefault(row.tobytes(), row)
        return np.stack(list(rows.values()))


@dataclass(frozen=True)
class Adder(Task):
    """`a+b=` -> the sum, each operand `digits` long, the sum `digits + 1`, zero-padded."""

    digits: int = 2

    def write(self, row: np.ndarray) -> tuple[str, str]:
        d = self.digits
        a, b = (int("".join(map(str, row[i : i + d]))) for i in (0, d))
        return f"{a:0{d}d}+{b:0{d}d}=", f"{a + b:0{d + 1}d}"


@dataclass(frozen=True)
class Sort(Task):
    """A list of symbols then `=` -> the same symbols in ascending order."""

    def write(self, row: np.ndarray) -> tuple[str, str]:
        return "".join(SYMBOLS[v] for v in row) + "=", "".join(SYMBOLS[v] for v in sorted(row))


def task_settings(cfg: TaskConfig) -> dict[str, object]:
    """The settings that decide a task's examples (the ones of other tasks left out): what meta.json records."""
    used = ("name", *USED.get(cfg.name, ()), "examples", "seed")
    return {k: getattr(cfg, k) for k in TASK_SETTINGS if k in used}


def changed_settings(prepared: dict[str, object], cfg: TaskConfig) -> list[str]:
    """The task.* keys whose value differs between a folder's recorded settings and a config ([] when they agree)."""
    wanted = task_settings(cfg)
    return [f"task.{k}" for k in TASK_SETTINGS if prepared.get(k) != wanted.get(k)]


def make_task(cfg: TaskConfig) -> Task:
    """The task a `task` config section names."""
    if cfg.name == "adder":
        return Adder("adder", 10, 2 * cfg.digits, string.digits + "+=", cfg.digits)
    if cfg.name == "sort":
        return Sort("sort", cfg.values, cfg.length, SYMBOLS[: cfg.values] + "=")
    raise GptlabError(f"task.name '{cfg.name}' is not a task", "use task.name=adder or task.name=sort")


def task_examples(cfg: TaskConfig) -> dict[str, list[tuple[str, str]]]:
    """The (prompt, answer) texts of each split: train, val, test."""
    task = make_task(cfg)
    pairs = [task.write(row) for row in task.draw(cfg.examples, cfg.seed)]
    splits, start = {}, 0
    for name, fraction in SPLIT_FRACTIONS:
        end = len(pairs) if name == "test" else start + round(fraction * len(pairs))
        splits[name], start = pairs[start:end], end
    return splits


def prepare_task(cfg: TaskConfig, data_dir: str | Path, overwrite: bool = False) -> PrepareResult:
    """Write a task's examples into `data_dir` (skipped when already there with the same settings)."""
    out = Path(data_dir)
    if out.exists() and not out.is_dir():
        raise GptlabError(f"data.dir '{out}' is a file", "set data.dir to a folder")
    settings = task_settings(cfg)
    meta = None if overwrite else shards.read_meta(out / "meta.json")
    if meta is not None:
        if meta.get("format") != "task" or meta.get("settings") != settings:
            raise GptlabError(
                f"'{out}' already holds data prepared from another source or setting",
                "pass --overwrite, or set data.dir to a new folder",
            )
        if meta.get("complete"):
            return PrepareResult(out, meta, skipped=True)
    task = make_task(cfg)
    tokenizer = task.tokenizer()
    bos = tokenizer.special_ids[BOS]
    encode = functools.partial(tokenizer.encode, allow_special=True)  # the answer ends with the EOS special
    splits = {
        name: [([bos, *encode(prompt)], encode(answer + EOS)) for prompt, answer in pairs]
        for name, pairs in task_examples(cfg).items()
    }
    if not all(splits.values()):
        sizes = ", ".join(f"{k} {len(v)}" for k, v in splits.items())
        drawn = sum(map(len, splits.values()))
        if drawn < cfg.examples:  # the task has no more distinct examples than these
            raise GptlabError(
                f"task {task.name} has only {drawn} distinct examples, too few for three splits ({sizes})",
                "make the task bigger (" + " or ".join(f"task.{k}" for k in USED[task.name]) + ")",
            )
        raise GptlabError(f"task.examples={cfg.examples} leaves a split empty ({sizes})", "raise task.examples")
    meta = {
        "format_version": shards.FORMAT_VERSION, "format": "task", "complete": True, "settings": settings,
        "source": f"task:{task.name}", "source_description": f"{sum(map(len, splits.values())):,} examples",
        "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eos_id,
        "dtype": token_dtype(tokenizer.vocab_size, "auto").name,
    }  # fmt: skip
    return PrepareResult(out, write_examples(out, tokenizer, splits, meta), skipped=False)


def exact_match(predicted: list[list[int]], answers: list[list[int]]) -> float:
    """The share of predictions equal to their answer, token for token (a prediction is what came before <EOS>)."""
    if len(predicted) != len(answers) or not answers:
        raise ValueError(f"{len(predicted)} predictions for {len(answers)} answers")
    return sum(list(p) == list(a) for p, a in zip(predicted, answers)) / len(answers)
