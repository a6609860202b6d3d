"""`gptlab plot`: loss, evaluation metrics and learning rate of one or several runs in one PNG (matplotlib)."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptlab.data.shards import write_atomic
from gptlab.errors import GptlabError, write_error

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STEP_KEYS = ("step", "epoch")  # what places a record; every other numeric field of an evaluation is a metric
# an evaluation record repeats the epoch's training numbers: the step records draw those already
TRAINING_KEYS = ("lr", "train_loss", "train_ppl")


def smooth(values: Sequence[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average: s_n = a_n / (1 - beta^n), a_n = beta a_(n-1) + (1 - beta) v_n."""
    avg, out = 0.0, []
    for n, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**n))
    return out


def new_figure(nrows: int = 1, ncols: int = 1, width: float = 6.4, height: float = 4.0) -> tuple[Figure, Any]:
    """A matplotlib figure drawn by the Agg canvas (no pyplot, no display), and its axes as a 2-D array."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise GptlabError("plotting needs matplotlib, which is not installed", "pip install 'gptlab[plot]'") from e
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def check_output(path: str | Path) -> Path:
    """The path of a PNG to write, refused before any work when its folder does not exist or it is a folder."""
    path = Path(path)
    if not path.parent.is_dir():
        raise GptlabError(f"cannot write '{path}': the folder '{path.parent}' does not exist", "create it first")
    if path.is_dir():
        raise GptlabError(f"cannot write '{path}': it is a folder", f"give a file name, e.g. '{path / 'plot.png'}'")
    return path


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write the figure as a PNG atomically (a temporary name, then renamed), so no half-drawn file is left."""
    path = check_output(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    try:
        write_atomic(path, buf.getvalue())
    except OSError as e:  # a read-only folder, a full disk
        raise write_error(e, path) from e
    return path


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_metrics(run_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A run's metrics.jsonl as (step records, evaluation records); other records (samples) are left out."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise GptlabError(f"'{run_dir}' has no metrics.jsonl", "pass the train.out_dir of a run that has trained")
    steps, evals = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line half-written by a crash
            continue
        if not isinstance(record, dict) or not _number(record.get("step")) or "checkpoint" in record:
            continue  # not a metric record, or a task run's final test scores (of its best checkpoint)
        if "loss" in record:
            steps.append(record)
        elif any(_number(v) for k, v in record.items() if k not in STEP_KEYS):
            evals.append(record)
    if not steps and not evals:
        raise GptlabError(f"'{path}' holds no metrics", "train the run for at least one step first")
    return steps, evals


def evaluation_metrics(records: list[dict[str, Any]]) -> list[str]:
    """The numeric metrics of evaluation records (val_loss, val_ppl, ...), in the order they first appear."""
    names: list[str] = []
    for record in records:
        names += [k for k, v in record.items() if k not in (*STEP_KEYS, *TRAINING_KEYS, *names) and _number(v)]
    return names


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if _number(r.get(key))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _labels(run_dirs: Sequence[str | Path]) -> list[str]:
    """Each run's folder name; the whole path where two names clash."""
    names = [Path(d).resolve().name for d in run_dirs]
    return [name if names.count(name) == 1 else str(d) for name, d in zip(names, run_dirs)]


def plot_runs(run_dirs: Sequence[str | Path], out_png: str | Path, smoothing: float = 0.9) -> Path:
    """Draw the train loss (raw and smoothed), validation loss, every other evaluation metric and the learning rate
    of each run (one colour per run) into one PNG; returns its path."""
    if not run_dirs:
        raise GptlabError("no run directories given", "pass one or more train.out_dir folders")
    if not 0 <= smoothing < 1:
        raise GptlabError(f"smoothing must be in [0, 1), got {smoothing:g}", "e.g. 0.9")
    check_output(out_png)
    runs = [read_metrics(d) for d in run_dirs]
    # val_loss shares the train loss's panel; every other evaluation metric gets one of its own
    metrics = [k for k in evaluation_metrics([r for _, evals in runs for r in evals]) if k != "val_loss"]
    panels = ["loss", *metrics, "lr"]
    fig, axes = new_figure(math.ceil(len(panels) / 2), 2)
    ax_of = dict(zip(panels, axes.flat))
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    for i, ((steps, evals), label) in enumerate(zip(runs, _labels(run_dirs))):
        color = f"C{i % 10}"  # the default colour cycle, one colour per run
        x, loss = _series(steps, "loss")
        ax = ax_of["loss"]
        if x:
            ax.plot(x, loss, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(x, smooth(loss, smoothing), color=color, label=f"{label} train")
        vx, val = _series(evals, "val_loss")
        if vx:
            ax.plot(vx, val, color=color, linestyle="--", marker="o", markersize=3, label=f"{label} val")
        for key in metrics:
            mx, my = _series(evals, key)
            if mx:
                ax_of[key].plot(mx, my, color=color, marker="o", markersize=3, label=label)
        lx, lr = _series(steps, "lr")
        if lx:
            ax_of["lr"].plot(lx, lr, color=color, label=label)
    for key, ax in ax_of.items():
        ax.set_title({"loss": "loss", "lr": "learning rate"}.get(key, key))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    ax_of["lr"].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return save_png(fig, out_png)
