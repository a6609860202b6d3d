"""Learning-rate schedules as pure functions of the step, so resuming needs no scheduler state.

With train.schedule_unit=epoch the schedule's position is the epoch, not the step: the rate of every step of
epoch e (of E, the budget's epochs, a last partial one included) is the schedule's factor at e of E, as a per-epoch
scheduler of Keras or Lightning sets it. The warmup alone still ramps per step (train.warmup_iters steps), its factor
multiplying the epoch's; with warmup_iters=0 the rate changes at epoch boundaries only.
"""

from __future__ import annotations

import math

from gptlab.config import TrainConfig

SCHEDULES = ("cosine", "linear", "constant", "onecycle", "wsd")


def lr_factor(step: int, total: int, cfg: TrainConfig, steps_per_epoch: int | None = None) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `total`.

    `steps_per_epoch` is needed with train.schedule_unit=epoch (an epoch of random mode is eval_interval steps)."""
    warmup = cfg.warmup_iters
    if cfg.schedule_unit == "epoch":
        if not steps_per_epoch:
            raise ValueError("train.schedule_unit=epoch needs the steps per epoch")
        ramp = _warmup(step, warmup, cfg.schedule) if step < warmup else 1.0
        return ramp * _decay(step // steps_per_epoch, math.ceil(total / steps_per_epoch), 0, cfg)
    if step < warmup:
        return _warmup(step, warmup, cfg.schedule)
    return _decay(step, total, warmup, cfg)


def _warmup(step: int, warmup: int, schedule: str) -> float:
    """The factor at `step` of the `warmup` steps that rise to the peak."""
    if schedule == "onecycle":  # cosine ramp from peak/25, as torch's OneCycleLR
        start = 1 / 25
        return start + (1 - start) * (1 - math.cos(math.pi * step / warmup)) / 2
    return (step + 1) / warmup


def _decay(step: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    """The factor at `step` of `total` (steps or epochs) after a warmup of `warmup` of them."""
    floor = cfg.min_lr_ratio
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if cfg.schedule in ("cosine", "onecycle"):
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return 1 - (1 - floor) * progress
    if cfg.schedule == "wsd":  # warmup, stable, then a linear decay over the last decay_fraction of steps
        decay_start = total - int(total * cfg.decay_fraction)
        if step < decay_start:
            return 1.0
        return 1 - (1 - floor) * min(1.0, (step - decay_start) / max(1, total - decay_start))
    return 1.0  # constant
