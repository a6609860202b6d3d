"""Evaluate a trained run: loss, perplexity and bits-per-byte on text, and HellaSwag-style multiple choice.

`evaluate_run` is what `gptlab eval` calls; it fills an `EvalReport` with one section per measurement ("text",
"hellaswag"), each a dataclass with `summary()`, so a further kind of result is one more section. The pieces work
alone too: `score_tokens`/`score_stream` score token ids with any model, `eval_tokens` finds the ids to score,
`load_hellaswag`, `ending_loglikelihoods` and `score_choices` do the multiple choice, `hellaswag_file` downloads
the official set.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gptlab import threads
from gptlab.config import Config
from gptlab.data.batches import PreparedData, load_prepared
from gptlab.data.shards import read_meta
from gptlab.data.sources import cache_dir
from gptlab.data.tasks import changed_settings
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.progress import progress_bar
from gptlab.tokenizers import Tokenizer
from gptlab.train import checkpoint as ckpt
from gptlab.train.task_metrics import check_task_context, task_exact_match
from gptlab.train.trainer import autocast, select_device, select_dtype

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
SPLITS = ("train", "val")
UNCOVERED_FIX = "evaluate a run whose tokenizer covers the text (bpe, gpt2: every byte is a token)"
HELLASWAG_FORMAT = 'each line must be one JSON object with "ctx", "endings" and "label" (HellaSwag\'s format)'


# ----- results ----------------------------------------------------------------------------------------------------
@dataclass
class TextScore:
    """Next-token loss over a token stream; bits_per_byte is None when the scored tokens hold no text bytes."""

    source: str
    split: str | None
    tokens: int  # tokens predicted (every token but the first)
    bytes: int  # UTF-8 bytes of the predicted tokens' text (special tokens count 0)
    loss: float  # mean nats per token
    perplexity: float
    bits_per_byte: float | None

    def summary(self) -> str:
        where = f"{self.source} ({self.split} split)" if self.split else self.source
        bpb = "n/a" if self.bits_per_byte is None else f"{self.bits_per_byte:.4f}"
        return (
            f"text: {where}: {self.tokens:,} tokens, {self.bytes:,} bytes\n"
            f"  loss {self.loss:.4f} nats/token, perplexity {self.perplexity:.3f}, bits-per-byte {bpb}"
        )


@dataclass
class ChoiceScore:
    """Multiple-choice accuracy: by summed log-likelihood of each ending (acc) and by its per-token mean (acc_norm)."""

    source: str
    n: int
    correct: int
    correct_norm: int
    acc: float
    acc_norm: float

    def summary(self) -> str:
        return f"hellaswag: {self.source}: n {self.n:,}, acc {self.acc:.4f}, acc_norm {self.acc_norm:.4f}"


@dataclass
class TaskScore:
    """A synthetic task's exact match of greedy answers per split (valid and test)."""

    task: str
    source: str
    examples: dict[str, int]
    exact_match: dict[str, float]

    def summary(self) -> str:
        scores = ", ".join(f"{split} {v:.4f} ({self.examples[split]:,})" for split, v in self.exact_match.items())
        return f"task: {self.task} on {self.source}: exact match {scores}"


@dataclass
class EvalReport:
    """Everything `gptlab eval` measured on one checkpoint; `sections` maps a name to a result with `summary()`."""

    run_dir: str
    checkpoint: str
    device: str
    dtype: str
    sections: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON: the run, then each section's fields under its name."""
        head = {"run_dir": self.run_dir, "checkpoint": self.checkpoint, "device": self.device, "dtype": self.dtype}
        return {**head, **{name: asdict(s) for name, s in self.sections.items()}}

    def summary(self) -> str:
        """A few readable lines: the run, then one block per section."""
        head = f"run {self.run_dir} (checkpoint {self.checkpoint}, {self.device}, {self.dtype})"
        return "\n".join([head, *(s.summary() for s in self.sections.values())])


# ----- loss, perplexity, bits-per-byte ----------------------------------------------------------------------------
def _windows(chunks: Iterable[np.ndarray], width: int, limit: int | None) -> Iterator[np.ndarray]:
    """Windows of `width` tokens over the chunks read as one stream, each starting on the previous one's last token
    (so every token but the first is a target exactly once); the last may be shorter. At most `limit` tokens."""
    buf = np.empty(0, dtype=np.int64)
    for chunk in chunks:
        if limit is not None:
            chunk, limit = chunk[:limit], limit - min(limit, len(chunk))
        i = 0
        while i < len(chunk):
            if not len(buf) and len(chunk) - i >= width:  # the common case: a view into the chunk, no copy
                yield chunk[i : i + width]
                i += width - 1
                continue
            take = min(width - len(buf), len(chunk) - i)
            buf = np.concatenate([buf, np.asarray(chunk[i : i + take], dtype=np.int64)])
            i += take
            if len(buf) == width:
                yield buf
                buf, i = np.empty(0, dtype=np.int64), i - 1  # the next window starts on this one's last token
        if limit == 0:
            break
    if len(buf) >= 2:
        yield buf


class _ByteCounter:
    """UTF-8 bytes of target tokens. Special tokens (<|endoftext|>, ...) count 0: they mark documents, they are not
    text, and their spelling differs between tokenizers, so bits-per-byte stays a measure of the text alone."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        table = tokenizer.token_bytes()
        self.lengths = None
        if table is not None:  # every gptlab tokenizer: a token's bytes are a fixed string
            self.lengths = np.array([len(b) for b in table], dtype=np.int64)
            self.lengths[list(tokenizer.special_ids.values())] = 0

    def count(self, window: np.ndarray) -> int:
        """Bytes of window[1:], the tokens this window predicts."""
        if self.lengths is not None:
            return int(self.lengths[window[1:]].sum())
        # a foreign tokenizer.json whose decoding is not a join of token bytes (say SentencePiece's leading-space
        # rule): the text the predicted tokens add after the window's first token
        decode = self.tokenizer.hf.decode
        ids = window.tolist()
        full, head = decode(ids, skip_special_tokens=True), decode(ids[:1], skip_special_tokens=True)
        return len(full.encode()) - len(head.encode())


def _device_of(model: GPT) -> torch.device:
    return next(model.parameters()).device


def score_stream(
    model: GPT,
    tokenizer: Tokenizer,
    chunks: Iterable[np.ndarray],
    *,
    batch_size: int = 8,
    max_tokens: int | None = None,
    dtype: torch.dtype = torch.float32,
    source: str = "tokens",
    split: str | None = None,
    quiet: bool = True,
) -> TextScore:
    """Loss, perplexity and bits-per-byte of 1-D token arrays read as one stream (shards, say) under `model`.

    Non-overlapping windows of up to block_size+1 tokens, each starting on the last token of the one before, so
    every token after the first is predicted exactly once, from the tokens before it in its window; `batch_size`
    windows go through the model at a time. Per-token losses are fp32 (logits cast up under autocast) and summed
    in float64. bits_per_byte = total nats / ln 2 / the UTF-8 bytes of the predicted tokens' text, where special
    tokens such as <|endoftext|> count 0 bytes (their loss is counted: ending a document is part of the text's
    cost); tokens are byte strings in every gptlab tokenizer, so the count is exact and does not depend on
    where the windows fall. `max_tokens` caps the tokens predicted.
    """
    if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise GptlabError("batch size and max tokens must be at least 1", "e.g. --batch-size 8 --max-tokens 100000")
    chunks = [chunks] if isinstance(chunks, np.ndarray) else chunks
    limit = None if max_tokens is None else max_tokens + 1
    total = sum(len(c) for c in chunks) if isinstance(chunks, Sequence) else None
    total = min(total, limit) if total is not None and limit is not None else total
    counter = _ByteCounter(tokenizer)
    device = _device_of(model)
    nats, tokens, nbytes = 0.0, 0, 0
    cpu_threads = threads.governor(adaptive=device.type == "cpu")

    def run(batch: list[np.ndarray]) -> None:
        nonlocal nats, tokens, nbytes
        x = torch.from_numpy(np.stack(batch).astype(np.int64)).to(device)
        with cpu_threads.unit(tuple(x.shape)), autocast(device, dtype):  # a probe is compared at one shape
            logits = model(x[:, :-1])
        losses = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        nats += float(losses.double().sum())
        tokens += losses.numel()
        nbytes += sum(counter.count(w) for w in batch)

    model.eval()
    with progress_bar(transient=True) as bar, torch.inference_mode():
        task = bar.add_task("eval", total=total, info="", visible=not quiet)
        batch: list[np.ndarray] = []
        for window in _windows(chunks, model.cfg.block_size + 1, limit):
            if batch and len(window) != len(batch[0]):  # only the last window is shorter: it goes alone
                run(batch)
                batch = []
            batch.append(window)
            if len(batch) == batch_size:
                run(batch)
                batch = []
                bar.update(task, completed=tokens)
        if batch:
            run(batch)
    if tokens == 0:
        raise GptlabError(f"{source} has fewer than 2 tokens: nothing to score", "give it more text")
    loss = nats / tokens
    bpb = nats / math.log(2) / nbytes if nbytes else None
    return TextScore(source, split, tokens, nbytes, loss, math.exp(loss) if loss < 700 else math.inf, bpb)


def score_tokens(
    model: GPT, tokenizer: Tokenizer, ids: Sequence[int] | np.ndarray | torch.Tensor, **kwargs: Any
) -> TextScore:
    """Loss, perplexity and bits-per-byte of one 1-D token sequence (see `score_stream` for the rules)."""
    ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids, dtype=np.int64)
    return score_stream(model, tokenizer, [ids.reshape(-1)], **kwargs)


def _same_tokenizer(a: Path, b: Path) -> bool:
    if a.read_bytes() == b.read_bytes():
        return True
    return Tokenizer.load(a).fingerprint() == Tokenizer.load(b).fingerprint()  # the same JSON, written differently


def eval_tokens(
    run_dir: str | Path, cfg: Config, tokenizer: Tokenizer, data: str | Path | None = None, split: str = "val"
) -> tuple[list[np.ndarray], str, str | None]:
    """(token arrays, source, split) to score: a UTF-8 text file encoded with the run's tokenizer, a prepared text
    folder's `split` shards (same tokenizer as the run's), or, without `data`, the run's own data.dir."""
    if split not in SPLITS:
        raise GptlabError(f"unknown split '{split}'", "use val or train")
    if data is None:
        folder = Path(cfg.data.dir)
        if not (folder / "meta.json").is_file():
            raise GptlabError(
                f"the run's data.dir '{folder}' holds no prepared data",
                "pass --data with a text file or a prepared data folder, or prepare the run's data again",
            )
    else:
        folder = Path(data).expanduser()
        if not folder.exists():
            raise GptlabError(f"data '{data}' not found", "give a UTF-8 text file or a prepared data folder")
        if folder.is_file():
            try:
                # scored as `gptlab prepare` would have encoded it: special tokens' text gets their ids
                ids = tokenizer.encode(folder.read_text(encoding="utf-8"), allow_special=True)
            except UnicodeDecodeError as e:
                raise GptlabError(
                    f"'{folder}' is not UTF-8 text ({e.reason} at byte {e.start})", "convert it to UTF-8"
                ) from e
            except GptlabError as e:  # a character vocabulary that lacks some of its characters
                raise GptlabError(f"'{folder}': {e.what}", UNCOVERED_FIX) from e
            return [np.asarray(ids, dtype=np.int64)], str(data), None
    prepared = load_prepared(folder)
    if prepared.examples is not None:
        raise GptlabError(
            f"'{folder}' holds prompt/response examples (data.format=sft), not a text stream",
            "score a text file or a text prepared folder with --data; an sft run's val_loss is in its metrics.jsonl",
        )
    if not _same_tokenizer(prepared.tokenizer_path, Path(run_dir) / "tokenizer.json"):
        raise GptlabError(
            f"the data in '{folder}' was prepared with another tokenizer than the run '{run_dir}'",
            f"give --data a text file (it is encoded with the run's tokenizer), or prepare the data with "
            f"data.tokenizer={Path(run_dir) / 'tokenizer.json'}",
        )
    return getattr(prepared, split), str(folder), split


def _task_folder(run_dir: str | Path, cfg: Config, data: str | Path | None) -> PreparedData | None:
    """The task examples `data` (or the run's data.dir) holds, checked against the run; None for anything else."""
    folder = Path(data if data is not None else cfg.data.dir).expanduser()
    meta = read_meta(folder / "meta.json") if folder.is_dir() else None
    if meta is None or meta.get("format") != "task":
        return None
    prepared = load_prepared(folder)
    if not _same_tokenizer(prepared.tokenizer_path, Path(run_dir) / "tokenizer.json"):
        raise GptlabError(
            f"the task examples in '{folder}' were prepared with another tokenizer than the run '{run_dir}'",
            "give --data the task folder the run was trained on",
        )
    changed = changed_settings(meta.get("settings") or {}, cfg.task)
    if changed:  # other examples: their test split may hold the run's training examples
        raise GptlabError(
            f"the task examples in '{folder}' were prepared with other task settings than the run '{run_dir}' "
            f"({', '.join(changed)})",
            "prepare the task again with the run's config.yaml, or give --data the folder the run was trained on",
        )
    check_task_context(prepared.examples, cfg.model.block_size)
    return prepared


def score_task(model: GPT, task: PreparedData) -> TaskScore:
    """Exact match of greedy answers on a task folder's val and test splits."""
    eos, examples = task.meta["eot_id"], task.examples or {}
    splits = [s for s in ("val", "test") if s in examples]
    return TaskScore(
        task.meta["settings"]["name"], str(task.dir), {s: len(examples[s]) for s in splits},
        {s: task_exact_match(model, examples[s], eos) for s in splits},
    )  # fmt: skip


# ----- multiple choice (HellaSwag) --------------------------------------------------------------------------------
@dataclass
class Choice:
    """One multiple-choice question: a context, its candidate endings and the index of the right one."""

    ctx: str
    endings: list[str]
    label: int
    where: str = ""  # where it was read ("'file' line N"), for errors


def load_hellaswag(path: str | Path) -> list[Choice]:
    """The examples of a HellaSwag-format .jsonl (`ctx`, or `ctx_a` + `ctx_b`; `endings`; `label`), all checked."""
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"HellaSwag file '{path}' not found", "give --hellaswag the path of a .jsonl file")
    examples = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                examples.append(_choice(line, f"'{path}' line {n}"))
    if not examples:
        raise GptlabError(f"HellaSwag file '{path}' holds no examples", HELLASWAG_FORMAT)
    return examples


def _choice(line: str, where: str) -> Choice:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise GptlabError(f"{where} is not JSON ({e.msg})", HELLASWAG_FORMAT) from None
    if not isinstance(row, dict):
        raise GptlabError(f"{where} is not a JSON object", HELLASWAG_FORMAT)
    ctx = row.get("ctx")
    if ctx is None and "ctx_a" in row:  # the official file has both; other copies may carry only the parts
        ctx = " ".join(p for p in (row["ctx_a"], row.get("ctx_b", "")) if p)
    endings, label = row.get("endings"), row.get("label")
    for name, value in (("ctx", ctx), ("endings", endings), ("label", label)):
        if value is None:
            raise GptlabError(f"{where} has no '{name}'", HELLASWAG_FORMAT)
    if not isinstance(ctx, str) or not ctx:
        raise GptlabError(f"{where}: 'ctx' must be non-empty text", HELLASWAG_FORMAT)
    if not isinstance(endings, list) or not endings or not all(isinstance(e, str) for e in endings):
        raise GptlabError(f"{where}: 'endings' must be a non-empty list of texts", HELLASWAG_FORMAT)
    if isinstance(label, str) and label.isdigit():  # Hugging Face's copy stores labels as text
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise GptlabError(f"{where}: label {label!r} is not an index of its {len(endings)} endings", HELLASWAG_FORMAT)
    return Choice(ctx, endings, label, where)


def hellaswag_file(spec: str | Path | None = None) -> Path:
    """A HellaSwag .jsonl: `spec` as a path, or (None or "val") the official validation file, downloaded once into
    $GPTLAB_CACHE/hellaswag (default ~/.cache/gptlab/hellaswag) under a temporary name and renamed into place."""
    if spec is not None and str(spec) != "val":
        return Path(spec).expanduser()
    folder = cache_dir() / "hellaswag"
    path = folder / "hellaswag_val.jsonl"
    if path.is_file():
        return path
    tmp = folder / f".hellaswag_val.jsonl.tmp-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(HELLASWAG_URL, timeout=60) as r, open(tmp, "wb") as out:
            shutil.copyfileobj(r, out)
        tmp.replace(path)
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise GptlabError(
            f"could not download HellaSwag from {HELLASWAG_URL} ({getattr(e, 'reason', e)})",
            "offline? download hellaswag_val.jsonl where there is internet and pass --hellaswag PATH to it",
        ) from e
    return path


def _rows(tokenizer: Tokenizer, example: Choice, block_size: int, where: str) -> list[tuple[list[int], int]]:
    """(tokens, ending length) per ending: the context cut on the left so context + ending fits the model, which
    sees all but the last token; an ending longer than the context keeps its first block_size tokens."""
    try:
        # benchmark text is plain text, whatever it holds; endings get a leading space, as GPT-2 and llm.c score them
        ctx = tokenizer.encode(example.ctx, allow_special=False)
        ends = [tokenizer.encode(" " + e, allow_special=False)[:block_size] for e in example.endings]
    except GptlabError as e:
        raise GptlabError(f"{where}: {e.what}", UNCOVERED_FIX) from e
    return [(ctx[-(block_size + 1 - len(end)) :] + end, len(end)) for end in ends]


def ending_loglikelihoods(
    model: GPT,
    tokenizer: Tokenizer,
    examples: Sequence[Choice],
    *,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    quiet: bool = True,
) -> list[tuple[list[float], list[int]]]:
    """Per example, (summed log-likelihood, token count) of each ending given the context, the ending encoded as
    " " + ending. The endings of up to `batch_size` rows' worth of examples (at least one example) go through the
    model together, right-padded (attention is causal, so padding after a row changes nothing in it)."""
    if batch_size < 1:
        raise GptlabError("batch size must be at least 1", "e.g. --batch-size 8")
    device, T = _device_of(model), model.cfg.block_size
    out: list[tuple[list[float], list[int]]] = []
    cpu_threads = threads.governor(adaptive=device.type == "cpu")
    model.eval()
    with progress_bar(transient=True) as bar, torch.inference_mode():
        task = bar.add_task("hellaswag", total=len(examples), info="", visible=not quiet)
        while len(out) < len(examples):
            group, n_rows = [], 0
            for ex in examples[len(out) :]:
                if group and n_rows + len(ex.endings) > batch_size:
                    break
                group.append(ex)
                n_rows += len(ex.endings)
            rows = []
            for i, ex in enumerate(group, len(out) + 1):
                rows += _rows(tokenizer, ex, T, ex.where or f"example {i}")
            width = max(len(t) for t, _ in rows) - 1
            x = torch.zeros(len(rows), width, dtype=torch.long)
            y = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.bool)
            for r, (toks, n_end) in enumerate(rows):
                x[r, : len(toks) - 1] = torch.tensor(toks[:-1])
                y[r, : len(toks) - 1] = torch.tensor(toks[1:])
                mask[r, len(toks) - 1 - n_end : len(toks) - 1] = True  # the positions that predict the ending
            with cpu_threads.unit(tuple(x.shape)), autocast(device, dtype):  # a probe is compared at one shape
                logits = model(x.to(device))
            logp = logits.float().log_softmax(-1).gather(-1, y.to(device)[..., None])[..., 0].cpu()
            sums, counts = (logp.double() * mask).sum(1).tolist(), mask.sum(1).tolist()
            r = 0
            for ex in group:
                k = len(ex.endings)
                out.append((sums[r : r + k], counts[r : r + k]))
                r += k
            bar.update(task, completed=len(out))
    return out


def score_choices(
    model: GPT, tokenizer: Tokenizer, examples: Sequence[Choice], *, source: str = "examples", **kwargs: Any
) -> ChoiceScore:
    """Accuracy on multiple-choice examples: acc picks the ending of largest summed log-likelihood, acc_norm the
    largest per-token mean (length-normalised); ties go to the first. Other keywords as `ending_loglikelihoods`."""
    if not examples:
        raise GptlabError("there are no examples to score", "give at least one")
    correct = correct_norm = 0
    for ex, (sums, counts) in zip(examples, ending_loglikelihoods(model, tokenizer, examples, **kwargs)):
        means = [s / c for s, c in zip(sums, counts)]
        correct += sums.index(max(sums)) == ex.label
        correct_norm += means.index(max(means)) == ex.label
    n = len(examples)
    return ChoiceScore(source, n, correct, correct_norm, correct / n, correct_norm / n)


# ----- a run ------------------------------------------------------------------------------------------------------
def _checkpoint_name(run_dir: str | Path, which: str) -> str:
    if which == "best" and ckpt.read_pointer(Path(run_dir) / "checkpoints" / "best") is None:
        which = "latest"  # as load_run does
    return ckpt.find_checkpoint(run_dir, which).name


def evaluate_run(
    run_dir: str | Path,
    *,
    data: str | Path | None = None,
    split: str = "val",
    hellaswag: str | Path | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    checkpoint: str = "best",
    device: str = "auto",
    dtype: str = "auto",
    quiet: bool = True,
) -> EvalReport:
    """Evaluate a run's checkpoint: the text score on `data` (with neither `data` nor `hellaswag`: the run's own
    data.dir; `split` of a prepared folder) and, with `hellaswag` (a path, or "val": the official file, downloaded
    once), multiple-choice accuracy. A further kind of result goes into `report.sections` the same way."""
    choices = hellaswag_file(hellaswag) if hellaswag is not None else None
    examples = load_hellaswag(choices) if choices is not None else None  # a bad file fails before the model loads
    dev = select_device(device)
    cfg, model, tokenizer = ckpt.load_run(run_dir, checkpoint, dev)
    dt = select_dtype(dtype, dev)
    report = EvalReport(str(run_dir), _checkpoint_name(run_dir, checkpoint), str(dev), str(dt).removeprefix("torch."))
    task = _task_folder(run_dir, cfg, data) if data is not None or examples is None else None
    if task is not None:  # a task run (or --data naming a task folder): exact match instead of a text score
        report.sections["task"] = score_task(model, task)
    elif data is not None or examples is None:
        chunks, source, used_split = eval_tokens(run_dir, cfg, tokenizer, data, split)
        report.sections["text"] = score_stream(
            model, tokenizer, chunks, batch_size=batch_size, max_tokens=max_tokens, dtype=dt, source=source,
            split=used_split, quiet=quiet,
        )  # fmt: skip
    if examples is not None:
        report.sections["hellaswag"] = score_choices(
            model, tokenizer, examples, batch_size=batch_size, dtype=dt, source=str(choices), quiet=quiet
        )
    return report
