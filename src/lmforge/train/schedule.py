"""Learning-rate schedules as pure functions of progress, so resume needs no scheduler state.

`t` is the progress *after* the step being taken (step 1 is the first step; in token units, the tokens
consumed including this step's batch), so the first step of a warmup of W uses lr·1/W, as OLMo-core does.

    constant   lr (after an optional linear warmup)
    linear     warmup, then linear from lr to alpha_f·lr at `duration` (OLMo 1: alpha_f 0.1; annealing: 0)
    cosine     warmup, then half a cosine from lr to alpha_f·lr at `duration` (OLMo 2)
    inv_sqrt   warmup, then lr·sqrt(warmup / t)
    wsd        warmup, constant, then linear to alpha_f·lr over the last `decay` units of `duration`
"""

from __future__ import annotations

import math

from lmforge.core.errors import LmforgeError
from lmforge.train.config import ScheduleConfig


def check_schedule(config: ScheduleConfig, run_length: float) -> None:
    """Refuse, before training, a schedule the run would leave the warmup of without a decay to follow."""
    end = config.duration if config.duration is not None else run_length
    if run_length <= config.warmup:
        return  # the run ends within the warmup (e.g. a short test of a long recipe)
    if config.name in ("linear", "cosine") and end <= config.warmup:
        raise LmforgeError(f"schedule: duration {end} {config.units} must be longer than the warmup {config.warmup}")
    if config.name == "wsd":
        decay = config.decay if config.decay is not None else round(0.1 * end)
        if end - decay < config.warmup:
            raise LmforgeError(f"schedule: wsd warmup {config.warmup} + decay {decay} exceed the duration {end}")


def lr_multiplier(config: ScheduleConfig, t: float, duration: float) -> float:
    """LR as a fraction of the peak at progress `t`; `duration` is the run's length in the same units."""
    warmup = config.warmup
    if warmup and t <= warmup:
        return t / warmup
    name = config.name
    if name == "constant":
        return 1.0
    if name == "inv_sqrt":
        return math.sqrt(max(warmup, 1) / max(t, 1))
    end = config.duration if config.duration is not None else duration
    if name == "wsd":
        decay = config.decay if config.decay is not None else round(0.1 * end)
        start = end - decay
        if t <= start:
            return 1.0
        return 1.0 - (1.0 - config.alpha_f) * min(1.0, (t - start) / max(decay, 1))
    if end <= warmup:
        raise LmforgeError(f"schedule: duration {end} {config.units} must be longer than the warmup {warmup}")
    frac = min(1.0, (t - warmup) / (end - warmup))
    if name == "linear":
        return 1.0 - (1.0 - config.alpha_f) * frac
    if name == "cosine":
        return config.alpha_f + (1.0 - config.alpha_f) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise LmforgeError(f"unknown schedule {name!r}")
