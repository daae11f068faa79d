"""The one progress-bar rule: a tqdm bar on stderr when progress is wanted and stderr is a terminal; nothing
otherwise, so logs and pipes stay clean. Every stage (curation, tokenize, eval) shows progress through this."""

from __future__ import annotations

import sys
import time


class Progress:
    """`update(n)` advances the bar by n units; `note(text)` sets its postfix; `close()` ends it."""

    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True, unit_scale: bool = False):
        self.bar = None
        self.start = time.monotonic()
        if enabled and total and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=sys.stderr,
                            leave=False, dynamic_ncols=True)

    @property
    def shown(self) -> bool:
        return self.bar is not None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    __call__ = update

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
