"""Learning-rate schedules as pure functions of the step, so resuming needs no scheduler state."""

from __future__ import annotations

import math

from gptlab.config import TrainConfig

SCHEDULES = ("cosine", "linear", "constant", "onecycle", "wsd")


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based) of `total`."""
    warmup, floor = cfg.warmup_iters, cfg.min_lr_ratio
    if step < warmup:
        if cfg.schedule == "onecycle":  # cosine ramp from peak/25, as torch's OneCycleLR
            start = 1 / 25
            return start + (1 - start) * (1 - math.cos(math.pi * step / warmup)) / 2
        return (step + 1) / warmup
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
