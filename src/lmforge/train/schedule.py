"""Learning-rate schedules as pure functions of progress, so resume needs no scheduler state.

`t` is the progress *after* the step being taken (step 1 is the first step; in token units, the tokens
consumed including this step's batch), so the first step of a warmup of W uses lr·1/W, as OLMo-core does.
f = `final_lr_fraction` (unset: 0.1, wsd 0.0, as OLMo-core's defaults). Each formula is OLMo-core 3.0's
(olmo_core/optim/scheduler.py), tested against it; past `duration` every schedule holds f·lr.

    constant   lr (after an optional linear warmup)                              ConstantWithWarmup
    linear     warmup, then linear from lr to f·lr at `duration`                 LinearWithWarmup
    cosine     warmup, then half a cosine from lr to f·lr at `duration`          CosWithWarmup
    inv_sqrt   warmup, then f·lr + (1 - f)·lr·sqrt(warmup / t)                    InvSqrtWithWarmup
    wsd        warmup, constant, then linear to f·lr over the last `decay` units  WSD (decay_min_lr = f·lr)
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
    final = config.final_fraction()
    if name == "inv_sqrt":  # max(warmup, 1): without a warmup OLMo-core's sqrt(0 / t) would sit at f from step 1
        return final + (1.0 - final) * math.sqrt(max(warmup, 1) / max(t, 1))
    end = config.duration if config.duration is not None else duration
    if name == "wsd":
        decay = config.decay if config.decay is not None else round(0.1 * end)
        start = end - decay
        if t <= start:
            return 1.0
        return 1.0 - (1.0 - final) * min(1.0, (t - start) / max(decay, 1))
    if end <= warmup:
        raise LmforgeError(f"schedule: duration {end} {config.units} must be longer than the warmup {warmup}")
    frac = min(1.0, (t - warmup) / (end - warmup))
    if name == "linear":
        return 1.0 - (1.0 - final) * frac
    if name == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise LmforgeError(f"unknown schedule {name!r}")
