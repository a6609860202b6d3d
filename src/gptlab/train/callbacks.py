"""Callbacks on the trainer's events: logging, progress, evaluation, checkpointing, history."""

from __future__ import annotations

import json
import math
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from gptlab.data.shards import write_atomic
from gptlab.errors import GptlabError
from gptlab.progress import console, progress_bar
from gptlab.train.checkpoint import (
    find_checkpoint,
    load_model_tensors,
    load_weights,
    prune_checkpoints,
    read_pointer,
)
from gptlab.train.task_metrics import task_exact_match

if TYPE_CHECKING:
    from gptlab.train.trainer import Trainer


class Callback:
    """Override any of these; each receives the trainer and the event's metrics.

    With several ranks a callback runs on rank 0 alone (logging, progress, files), unless `all_ranks` is set:
    the callbacks that take part in collectives (evaluation, checkpoints) or steer the loop run on every rank.
    """

    all_ranks = False

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...

    def on_interval_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """Epoch mode: train.eval_interval steps into an epoch (not at its end). As on_epoch_end, with the train loss
        since the last evaluation and `mid_epoch: True`."""

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...

    def on_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None: ...

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None: ...

    def on_fit_end(self, trainer: Trainer) -> None:
        """The run finished: its budget is spent or a callback stopped it (not on Ctrl-C or an error)."""

    def on_test(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """A finished task run's test-split scores (of its best checkpoint)."""

    def on_sample(self, trainer: Trainer, record: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...


EVAL_METRICS = ("val_loss", "val_ppl", "train_loss", "train_ppl")  # in every evaluation record
TASK_METRICS = ("val_exact_match",)  # added by a task's evaluations


def check_monitor(monitor: str, task: bool) -> None:
    """Refuse a train.monitor that no evaluation will hold, before the first step (not after an epoch's work)."""
    known = [*EVAL_METRICS, *(TASK_METRICS if task else ())]
    if monitor in known:
        return
    fix = "choose one of " + ", ".join(known)
    if monitor in TASK_METRICS:
        fix = f"{monitor} is measured for a task (task.name=adder or sort); {fix}"
    raise GptlabError(f"train.monitor '{monitor}' is not an evaluated metric", fix)


def metrics_lines(path: Path) -> list[str]:
    """The lines of a run's metrics.jsonl ([] when there is none); bytes that are not UTF-8 are an error."""
    if not path.is_file():
        return []
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:  # json.dumps writes ASCII: such bytes are damage, not a line cut by a crash
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise GptlabError(
            f"'{path}' is not UTF-8 text (byte {e.start}, line {line})", "repair or delete that line, then resume again"
        ) from e


class MetricsLogger(Callback):
    """Appends one JSON line per step, per evaluation and per sample to metrics.jsonl."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = None

    def on_train_start(self, trainer: Trainer) -> None:
        if self.path.exists():  # on resume, drop what the lost steps after the checkpoint had logged
            kept = []
            for line in metrics_lines(self.path):
                try:
                    record = json.loads(line)
                except ValueError:  # a line half-written by a crash
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= trainer.step:
                    kept.append(line)
            write_atomic(self.path, "".join(line + "\n" for line in kept).encode())
        self.file = open(self.path, "a", buffering=1)

    def _write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")

    def on_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._write(metrics)

    def on_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._write(metrics)

    def on_test(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._write(metrics)

    def on_sample(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self._write(record)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.file:
            self.file.close()


class ProgressCallback(Callback):
    """A rich progress bar with the latest loss and throughput; on a stderr that is not a terminal (a log file under
    SLURM, nohup or CI), a plain line every `log_interval` steps instead."""

    def __init__(self, log_interval: int, enabled: bool = True) -> None:
        self.log_interval, self.enabled = log_interval, enabled
        self.bar = None
        self.plain = not console.is_terminal  # the bar is not drawn there (progress.py)

    def on_train_start(self, trainer: Trainer) -> None:
        self.bar = progress_bar()
        self.task = self.bar.add_task(
            "train", total=trainer.total_steps, completed=trainer.step, info="", visible=self.enabled
        )
        self.bar.start()
        self.val = ""
        self.start = self.last = (time.monotonic(), trainer.step)  # this session's first, and the last line's

    def on_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if metrics["step"] % self.log_interval == 0 or metrics["step"] == trainer.total_steps:
            info = f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} {metrics['tokens_per_s']:,.0f} tok/s{self.val}"
            self.bar.update(self.task, completed=metrics["step"], info=info)
            if self.plain and self.enabled:
                self._line(trainer, metrics)

    def _line(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """`step 250/2000 | loss 1.8734 | lr 9.1e-04 | 21,000 tok/s | 2 threads | 0:01:23 elapsed, 0:09:40 left`."""
        now, step = time.monotonic(), metrics["step"]
        rate = (step - self.last[1]) * trainer.tokens_per_step / max(now - self.last[0], 1e-9)  # since the last line
        elapsed = now - self.start[0]
        left = elapsed / max(step - self.start[1], 1) * (trainer.total_steps - step)  # evaluations included
        governor = getattr(trainer.stepper, "threads", None)  # the torch backend's (gptlab/threads.py)
        n = f" | {governor.current} thread{'s' if governor.current != 1 else ''}" if governor else ""
        clock = f"{timedelta(seconds=round(elapsed))} elapsed, {timedelta(seconds=round(left))} left"
        sys.stderr.write(f"step {step}/{trainer.total_steps} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.1e} | "
                         f"{rate:,.0f} tok/s{n} | {clock}\n")  # fmt: skip
        sys.stderr.flush()
        self.last = (now, step)

    def on_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self.val = f" val {metrics['val_loss']:.4f}"
        if self.enabled:  # a line per evaluation as it ends, so logs (not only terminals) show each epoch's row
            self.bar.console.print(eval_line(trainer, metrics), highlight=False, markup=False, soft_wrap=True)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.bar is not None:  # None when the fit failed before on_train_start reached this callback
            self.bar.stop()


def epoch_label(trainer: Trainer, record: dict[str, Any]) -> str:
    """A history row's epoch: `2`, or `2 (40%)` for an evaluation that far into epoch 2 (epoch mode's eval_interval)."""
    epoch = str(record["epoch"])
    if record.get("mid_epoch"):
        into = record["step"] - record["epoch"] * trainer.steps_per_epoch
        epoch += f" ({into / trainer.steps_per_epoch:.0%})"
    return epoch


def extra_metrics(record: dict[str, Any]) -> list[str]:
    """An evaluation's metrics besides the losses, perplexities and lr (a task's val_exact_match), in order."""
    return [k for k in record if k not in (*HistoryPrinter.FIXED, "lr", "mid_epoch")]


def eval_line(trainer: Trainer, record: dict[str, Any]) -> str:
    """One evaluation's history row as a line, printed as it ends:
    `epoch 3, step 440/1200: train loss 0.4123, val loss 0.3912, val exact match 0.8420`."""
    extra = "".join(f", {k.replace('_', ' ')} {record[k]:.4f}" for k in extra_metrics(record))
    return (f"epoch {epoch_label(trainer, record)}, step {record['step']}/{trainer.total_steps}: "
            f"train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f}{extra}")  # fmt: skip


def improves(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Whether `value` beats `best` (None: nothing yet) by more than `min_delta`, in the direction `mode` names."""
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


class Evaluator(Callback):
    """At each epoch end (and every train.eval_interval steps into an epoch in epoch mode): validation loss and
    perplexity, a task's exact match (of the weights' moving average with train.ema), then the `eval` event.

    When a task run finishes, its best checkpoint is loaded and scored on the test split (the `test` event).
    The loss is computed by every rank on its rows; a task's generations on rank 0, whose numbers all ranks take.
    """

    all_ranks = True

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._evaluate(trainer, metrics)

    def on_interval_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        self._evaluate(trainer, metrics)  # a history row of its own, marked mid_epoch

    def _evaluate(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        with trainer.averaged():  # train.ema: every number of the evaluation is the moving average's
            val_loss = trainer.evaluate()
            record = {**metrics, "train_ppl": _ppl(metrics["train_loss"]), "val_loss": val_loss,
                      "val_ppl": _ppl(val_loss)}  # fmt: skip
            if trainer.cfg.task.name != "none":
                model = trainer.inference_model()
                if model is not None:
                    examples, limit = trainer.data.examples["val"], trainer.cfg.task.eval_examples
                    record["val_exact_match"] = task_exact_match(model, examples, trainer.data.meta["eot_id"], limit)
        record = trainer.dist.broadcast(record)  # every rank keeps the same history and takes the same decisions
        trainer.history.append(record)
        trainer.fire("on_eval", {"step": trainer.step, **record})

    def on_fit_end(self, trainer: Trainer) -> None:
        if trainer.cfg.task.name == "none":
            return
        # no `best` after a resume from an older checkpoint whose best was pruned, until an evaluation beats it
        which = "best" if read_pointer(trainer.run_dir / "checkpoints" / "best") else "latest"
        best = find_checkpoint(trainer.run_dir, which)
        load_model_tensors(trainer.model, load_weights(best), str(best))  # the run is over: its best weights stay
        model = trainer.inference_model()
        result = {"step": trainer.step, "checkpoint": best.name}
        if model is not None:
            eos = trainer.data.meta["eot_id"]
            for split in ("val", "test"):
                result[f"{split}_exact_match"] = task_exact_match(model, trainer.data.examples[split], eos)
            write_atomic(trainer.run_dir / "results.json", json.dumps(result, indent=2).encode())
        trainer.results = trainer.dist.broadcast(result)
        trainer.fire("on_test", trainer.results)


class EarlyStopping(Callback):
    """Stops the run when `monitor` has not improved by `min_delta` for `patience` evaluations in a row."""

    all_ranks = True  # every rank stops at the same step: the history it reads is the same on all

    def __init__(self, monitor: str, mode: str, patience: int, min_delta: float = 0.0) -> None:
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta

    def _waited(self, history: list[dict[str, Any]]) -> int:
        """Evaluations since the last improvement (computed from the history, so a resumed run counts on)."""
        best, waited = None, 0
        for record in history:
            value = record[self.monitor]
            if improves(value, best, self.mode, self.min_delta):
                best, waited = value, 0
            else:
                waited += 1
        return waited

    def on_train_start(self, trainer: Trainer) -> None:
        self.on_eval(trainer, {})  # a resumed run that had stopped early stays stopped (unless patience rose)

    def on_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if trainer.history and self._waited(trainer.history) >= self.patience:
            trainer.request_stop(f"{self.monitor} has not improved for {self.patience} evaluations (early stopping)")


class Checkpointer(Callback):
    """After each evaluation: save a checkpoint, track the best by a metric, keep the last N."""

    all_ranks = True  # saving is collective: each rank writes its shards of the training state

    def __init__(self, monitor: str, mode: str, keep_last: int) -> None:
        """`keep_last`: the newest step folders kept besides the best (1: save best only, and the latest to resume)."""
        self.monitor, self.mode, self.keep_last = monitor, mode, keep_last

    def on_eval(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.monitor not in metrics:
            known = ", ".join(k for k in metrics if k not in ("step", "epoch", "mid_epoch"))
            raise GptlabError(f"train.monitor '{self.monitor}' is not an evaluated metric", f"choose one of {known}")
        value = metrics[self.monitor]
        best = trainer.best_metric
        improved = improves(value, best, self.mode)
        if improved:
            trainer.best_metric = value
        path = trainer.save_checkpoint(best=improved)
        if trainer.dist.is_main:
            prune_checkpoints(path.parent, self.keep_last)
        trainer.fire("on_checkpoint", path)


class HistoryPrinter(Callback):
    """Prints the history table at the end of the run (and a task's test score) and saves history.json.

    A row per epoch, and one per mid-epoch evaluation (epoch mode with train.eval_interval): its epoch column says
    how far into the epoch it was, e.g. `2 (40%)`."""

    FIXED = {"epoch": "epoch", "step": "step", "train_loss": "train loss", "train_ppl": "train ppl",
             "val_loss": "val loss", "val_ppl": "val ppl"}  # fmt: skip

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def on_test(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.enabled:
            scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith("_exact_match"))
            console.print(f"{metrics['checkpoint']} (best by {trainer.cfg.train.monitor}): {scores}")

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.failed:  # history.json stays as last written; a resume takes the history from its checkpoint
            return
        write_atomic(self.path, json.dumps(trainer.history, indent=2).encode())
        if not self.enabled or not trainer.history:
            return
        table = Table(title=f"history ({trainer.run_dir})")
        # the fixed columns, then any further metric (a task's exact match), then the learning rate
        extra = extra_metrics(trainer.history[-1])
        for col in [*self.FIXED.values(), *(k.replace("_", " ") for k in extra)]:
            table.add_column(col, justify="right")
        table.add_column("lr", justify="right", no_wrap=True, min_width=8)
        best = read_pointer(trainer.run_dir / "checkpoints" / "best")
        for h in trainer.history:
            mark = " *" if best == f"step_{h['step']}" else ""
            table.add_row(
                epoch_label(trainer, h), f"{h['step']}{mark}", f"{h['train_loss']:.4f}",
                f"{h.get('train_ppl', math.nan):.2f}", f"{h['val_loss']:.4f}", f"{h['val_ppl']:.2f}",
                *(f"{h.get(k, math.nan):.4f}" for k in extra), f"{h['lr']:.2e}",
            )  # fmt: skip
        console.print(table)
