"""Verifiable rewards for RLVR: a checker judges each completion against its prompt's reference answer.

Built-in checkers are eval's answer checkers (`lmforge.eval.answers`): `gsm8k` (the last number equals the
gold number) and `math` (the boxed answer is equivalent to the gold one). Both are time-bounded by
construction, so they run in this process. A user checker is a Python function named by its dotted path
(`package.module.function` or `package.module:function`) taking (completion, answer) and returning a bool or a
number (partial credit, 1 = correct); it runs in a child process, so one that hangs is stopped at `timeout_s`
(a thread cannot be stopped). A checker that raises or times out gives reward 0 for that completion; the
failure is counted and reported with the prompt's file and line, and the run goes on.

reward = correct · checker value  +  format_reward if `format_pattern` occurs in the completion.
"""

from __future__ import annotations

import importlib
import multiprocessing
import re
import sys
from dataclasses import dataclass, field
from typing import Callable

from lmforge.core.config import require
from lmforge.core.errors import LmforgeError
from lmforge.eval.answers import gsm8k_is_correct, math_is_correct

BUILTIN_CHECKERS: dict[str, Callable[[str, str], bool]] = {"gsm8k": gsm8k_is_correct, "math": math_is_correct}
REPORTED_FAILURES = 5  # failures printed one per line; the rest are counted


@dataclass
class RewardConfig:
    checker: str = "gsm8k"  # gsm8k, math, or a user function "package.module.function"
    correct: float = 1.0  # reward for a correct answer (Tülu 3 RLVR: 10)
    format_pattern: str | None = None  # a regex; when it occurs in the completion, format_reward is added
    format_reward: float = 0.0
    timeout_s: float = 5.0  # per call of a user checker

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(self.checker in BUILTIN_CHECKERS or "." in self.checker or ":" in self.checker, "checker",
                self.checker, f"must be one of {', '.join(BUILTIN_CHECKERS)} or a dotted path to a function")
        require(self.timeout_s > 0, "timeout_s", self.timeout_s, "must be positive")
        if self.format_pattern is not None:
            try:
                re.compile(self.format_pattern)
            except re.error as e:
                require(False, "format_pattern", self.format_pattern, f"must be a regular expression ({e})")


def import_checker(dotted: str) -> Callable:
    """The function at `package.module.function` or `package.module:function`."""
    module_name, _, name = dotted.rpartition(":") if ":" in dotted else dotted.rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise LmforgeError(f"reward checker {dotted!r} cannot be imported: {e}") from None
    if not callable(function):
        raise LmforgeError(f"reward checker {dotted!r} is not a function")
    return function


def _serve_checker(dotted: str, conn) -> None:
    """Child process: import the checker, then answer (completion, answer) requests with (ok, value)."""
    try:
        function = import_checker(dotted)
    except LmforgeError as e:
        conn.send((False, str(e)))
        return
    conn.send((True, "ready"))
    while True:
        try:
            completion, answer = conn.recv()
        except EOFError:
            return
        try:
            conn.send((True, float(function(completion, answer))))
        except Exception as e:  # the user's code: any failure is that completion's, not the run's
            conn.send((False, f"{type(e).__name__}: {e}"))


class CheckerProcess:
    """A user checker in a child process; restarted after a call that timed out."""

    def __init__(self, dotted: str, timeout_s: float):
        self.dotted, self.timeout_s = dotted, timeout_s
        self.process = None
        self.conn = None

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # fork would copy the trainer's threads and locks
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve_checker, args=(self.dotted, child), daemon=True)
        self.process.start()
        child.close()
        ok, message = self.conn.recv() if self.conn.poll(60) else (False, "did not start within 60 s")
        if not ok:
            self.close()
            raise LmforgeError(f"reward checker {self.dotted!r}: {message}")

    def __call__(self, completion: str, answer: str) -> float:
        if self.process is None or not self.process.is_alive():
            self._start()
        self.conn.send((completion, answer))
        if not self.conn.poll(self.timeout_s):
            self.close()
            raise TimeoutError(f"no answer within {self.timeout_s:g} s")
        ok, value = self.conn.recv()
        if not ok:
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.join()
            self.conn.close()
        self.process = None


@dataclass
class RewardBatch:
    rewards: list[float]
    correct: list[bool]  # the checker gave full credit
    failures: int  # checker calls that raised or timed out (reward 0)


@dataclass
class RewardFunction:
    """Scores completions; counts checker failures over the run (`errors`, `timeouts`)."""

    config: RewardConfig
    errors: int = 0
    timeouts: int = 0
    _check: Callable[[str, str], float] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        name = self.config.checker
        if name in BUILTIN_CHECKERS:
            self._check = BUILTIN_CHECKERS[name]
        else:
            import_checker(name)  # refuse a checker that cannot be imported before any compute
            self._check = CheckerProcess(name, self.config.timeout_s)
        self._format = re.compile(self.config.format_pattern) if self.config.format_pattern else None

    def __call__(self, completions: list[str], answers: list[str], where: list[str]) -> RewardBatch:
        """`where[i]`: the prompt's file and line, named when its checker fails."""
        c = self.config
        rewards, correct, failures = [], [], 0
        for completion, answer, place in zip(completions, answers, where):
            try:
                value = float(self._check(completion, answer))
            except Exception as e:  # a checker's failure costs its completion's reward, never the run
                timed_out = isinstance(e, TimeoutError)
                self.timeouts += timed_out
                self.errors += not timed_out
                failures += 1
                if self.errors + self.timeouts <= REPORTED_FAILURES:
                    what = "timed out" if timed_out else "raised"
                    print(f"{place}: reward checker {c.checker} {what} ({e}); reward 0", file=sys.stderr)
                value = 0.0
            reward = c.correct * value
            if self._format is not None and self._format.search(completion):
                reward += c.format_reward
            rewards.append(reward)
            correct.append(value >= 1.0)
        return RewardBatch(rewards, correct, failures)

    def close(self) -> None:
        if isinstance(self._check, CheckerProcess):
            self._check.close()
