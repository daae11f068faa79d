"""OLMo 2's repeated n-gram instance filter.

An instance is dropped from the loss when some n-gram with n in [min_period, max_period] occurs at least
`max_count` times back to back (e.g. the same 3 tokens repeated 32 times). Such degenerate runs cause loss
spikes (OLMo 2 paper, section 3.1). A segment that is an n-gram repeated k times is exactly a run of
positions j with x[j] == x[j + n] of length n * (k - 1), so each period costs a few vectorised passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmforge.core.config import require


@dataclass
class InstanceFilterConfig:
    enabled: bool = False
    min_period: int = 1
    max_period: int = 13
    max_count: int = 32

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(1 <= self.min_period <= self.max_period, "min_period", self.min_period,
                f"need 1 <= min_period <= max_period ({self.max_period})")
        require(self.max_count >= 2, "max_count", self.max_count, "must be >= 2")


def longest_true_run(mask: np.ndarray) -> int:
    if not mask.any():
        return 0
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return int((edges[1::2] - edges[::2]).max())


def has_repeated_ngram(tokens: np.ndarray, min_period: int = 1, max_period: int = 13, max_count: int = 32) -> bool:
    """True when some n-gram of length min_period..max_period repeats >= max_count times consecutively."""
    tokens = np.asarray(tokens)
    for period in range(min_period, max_period + 1):
        needed = period * (max_count - 1)
        if len(tokens) - period < needed:
            break
        if longest_true_run(tokens[period:] == tokens[:-period]) >= needed:
            return True
    return False


def keep_instance(tokens: np.ndarray, config: InstanceFilterConfig) -> bool:
    if not config.enabled:
        return True
    return not has_repeated_ngram(tokens, config.min_period, config.max_period, config.max_count)
