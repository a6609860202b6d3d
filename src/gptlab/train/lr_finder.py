"""The learning-rate finder (Smith 2015, fastai's `lr_find`): train a few hundred steps while the rate grows
exponentially, watch the smoothed loss, suggest a rate from where it falls fastest.

`lr_sweep` is the generic core (any `step(lr) -> loss`); `find_lr` runs it on a config's model and data with the
trainer's own pieces and leaves nothing behind; `LRFinderResult.plot` draws the curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from gptlab.config import Config
from gptlab.errors import GptlabError
from gptlab.plot import new_figure, save_png
from gptlab.progress import progress_bar
from gptlab.train.optim import set_lr
from gptlab.train.trainer import Trainer

DECADES_BELOW_MIN = 2  # the suggestion is looked for within this many decades of rate below the loss's minimum


@dataclass
class LRFinderResult:
    """A sweep: the rate, raw loss and smoothed loss of every step, and the suggested rate with the reason."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    min_lr: float  # the rate at the smoothed loss's minimum
    diverged: bool  # the sweep stopped early because the loss blew up
    why: str

    def plot(self, out_png: str | Path) -> Path:
        """Draw the raw and smoothed loss against the rate (log axis), the suggestion marked, into a PNG."""
        fig, axes = new_figure()
        ax = axes[0, 0]
        ax.plot(self.lrs, self.losses, color="C0", alpha=0.3, linewidth=0.8, label="loss")
        ax.plot(self.lrs, self.smoothed, color="C0", label="smoothed loss")
        ax.axvline(self.suggestion, color="C3", linestyle="--", label=f"suggested lr {self.suggestion:.1e}")
        ax.axvline(self.min_lr, color="0.5", linestyle=":", label=f"minimum at {self.min_lr:.1e}")
        ax.set_xscale("log")
        # the blow-up at the end would squash the interesting part: the y range is that of the curves up to the minimum
        upto = self.lrs.index(self.min_lr) + 1
        shown = self.losses[:upto] + self.smoothed[:upto]
        low, high = min(shown), max(shown)
        pad = 0.05 * (high - low) or 0.05 * abs(high) or 1.0
        ax.set_ylim(low - pad, high + pad)
        ax.set(xlabel="learning rate", ylabel="loss", title="learning-rate sweep")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        return save_png(fig, out_png)


def min_steps(smoothing: float) -> int:
    """The shortest sweep whose smoothed curve is not mostly lag: twice the average's window 1 / (1 - smoothing)."""
    return max(10, math.ceil(2 / (1 - smoothing) - 1e-9))


def lr_sweep(
    step: Callable[[float], float],
    start_lr: float,
    end_lr: float,
    steps: int,
    smoothing: float = 0.98,
    diverge: float = 4.0,
) -> LRFinderResult:
    """Call `step(lr)` (one optimizer step at that rate, returning its loss >= 0) at rates growing exponentially
    from `start_lr` to `end_lr` and suggest a rate.

    The loss is smoothed with a bias-corrected exponential moving average (`gptlab.plot.smooth`). The sweep stops
    early once the smoothed loss exceeds `diverge` times its best, or a loss is not finite.

    The suggestion is the rate where the smoothed loss falls fastest against log(lr) (Smith's "steepest descent"),
    looked for only within two decades of rate below the smoothed loss's minimum (fastai's other rule: about a
    decade below the minimum). The window keeps a wiggle of the flat start, where the loss hardly moves, from
    passing for the descent. The first tenth of the sweep, where the average still rests on a few losses, neither
    sets the best loss nor holds the minimum. A sweep that blows up at once, never falls, or falls only from its
    start is an error rather than a number.
    """
    if not 0 < start_lr < end_lr or not math.isfinite(end_lr):
        raise GptlabError(f"the sweep needs 0 < start rate < end rate, got {start_lr:g} and {end_lr:g}",
                          "e.g. --start-lr 1e-7 --end-lr 10")  # fmt: skip
    if not 0 <= smoothing < 1 or diverge <= 1:
        raise GptlabError(f"smoothing must be in [0, 1) and diverge above 1, got {smoothing:g} and {diverge:g}",
                          "e.g. smoothing=0.98, diverge=4")  # fmt: skip
    if steps < min_steps(smoothing):
        raise GptlabError(f"a sweep of {steps} steps is too short to smooth its loss (smoothing={smoothing:g})",
                          f"sweep at least {min_steps(smoothing)} steps (--steps)")  # fmt: skip
    skip = steps // 10
    lrs, losses, smoothed = [], [], []
    avg, best, diverged = 0.0, math.inf, False
    for i, lr in enumerate(np.geomspace(start_lr, end_lr, steps).tolist()):
        loss = float(step(lr))
        if not math.isfinite(loss):
            if not losses:
                raise GptlabError(f"the loss is {loss} at the first step (lr {lr:.1e})",
                                  "lower --start-lr, or check the config (e.g. train.dtype=float32)")  # fmt: skip
            diverged = True
            break
        avg = smoothing * avg + (1 - smoothing) * loss
        lrs.append(lr)
        losses.append(loss)
        smoothed.append(avg / (1 - smoothing ** (i + 1)))
        if i >= skip:
            best = min(best, smoothed[-1])
            if smoothed[-1] > diverge * best:
                diverged = True
                break
    suggestion, imin, why = _suggest(lrs, smoothed, skip, steps)
    return LRFinderResult(lrs, losses, smoothed, suggestion, lrs[imin], diverged, why)


def _suggest(lrs: list[float], smoothed: list[float], skip: int, steps: int) -> tuple[float, int, str]:
    """The steepest fall of the smoothed loss within the decades below its minimum: (rate, index of min, why)."""
    n = len(smoothed)
    if n < skip + 3:
        raise GptlabError(f"the loss blew up after {n} of {steps} steps (at lr {lrs[-1]:.1e})",
                          "lower --start-lr")  # fmt: skip
    sm = np.asarray(smoothed)
    imin = skip + int(np.argmin(sm[skip:]))
    top = float(sm[skip : imin + 1].max())
    if top - sm[imin] <= 0.01 * abs(top):
        raise GptlabError(f"the smoothed loss fell by less than 1% from lr {lrs[0]:.1e} to {lrs[-1]:.1e}",
                          "widen the sweep (--start-lr, --end-lr)")  # fmt: skip
    log_lr = np.log(lrs[: imin + 1])
    slope = np.gradient(sm[: imin + 1], log_lr)
    window = np.arange(imin + 1) >= skip
    window &= log_lr >= log_lr[imin] - DECADES_BELOW_MIN * math.log(10)
    i = int(np.argmin(np.where(window, slope, np.inf)))  # at worst the fall into the minimum itself
    why = (f"the smoothed loss falls fastest there, within {DECADES_BELOW_MIN} decades below its minimum at "
           f"lr {lrs[imin]:.1e}")  # fmt: skip
    if imin == n - 1:
        why += "; it still fell at the end of the sweep, so a higher --end-lr may find a higher rate"
    return lrs[i], imin, why


def find_lr(
    cfg: Config,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 200,
    smoothing: float = 0.98,
    quiet: bool = True,
) -> LRFinderResult:
    """Sweep the AdamW rate (train.lr) over a config's model and data; writes nothing and creates no run directory.

    Each step is a training step as `gptlab train` makes it (its batches, micro-batches, precision and clipping),
    from the config's initial weights. Muon's rate (train.optimizer=muon) moves with the swept one, keeping the
    ratio train.muon_lr / train.lr.
    """
    if cfg.train.backend != "torch":
        raise GptlabError(
            f"gptlab find-lr sweeps with the PyTorch backend, not train.backend={cfg.train.backend}",
            "drop train.backend: both backends take the same steps, so the rate it finds applies to either",
        )
    if cfg.train.lr <= 0:
        raise GptlabError("the sweep scales every rate by its ratio to train.lr, which is 0", "set train.lr above 0")
    # the sweep's length as the budget: torch.compile only where it pays for that many steps (compile_pays)
    sweep = replace(cfg, train=replace(cfg.train, max_iters=steps, max_tokens=None, max_epochs=None))
    trainer = Trainer(sweep, quiet=True, ephemeral=True)
    trainer.model.train()
    done = 0

    def step(lr: float) -> float:
        nonlocal done
        set_lr(trainer.optimizers, lr / cfg.train.lr)  # AdamW's groups get lr, Muon's lr * muon_lr / lr
        x, y = trainer.train_batches.batch(done)
        loss = float(trainer.stepper(x, y)[0])
        done += 1
        bar.update(task, completed=done, info=f"lr {lr:.1e} loss {loss:.4f}")
        return loss

    with progress_bar(transient=True) as bar:
        task = bar.add_task("lr sweep", total=steps, info="", visible=not quiet)
        try:
            return lr_sweep(step, start_lr, end_lr, steps, smoothing)
        except torch.OutOfMemoryError as e:
            raise GptlabError(
                f"out of memory with micro-batches of {trainer.micro_batch_size} x {cfg.model.block_size} tokens",
                "lower train.micro_batch_size (the batch is kept by accumulation), model.block_size or the model size",
            ) from e
