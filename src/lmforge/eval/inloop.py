"""In-loop evaluation for the trainer: the offline evaluation code on a fixed small subset.

`build_inloop_evaluators(config, tokenizer)` returns callables `evaluate(model) -> {metric: value}` that the
trainer runs every `eval_interval` steps (model in eval mode, under no_grad, time excluded from tokens/s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

MetricsFn = Callable[..., dict[str, float]]


@dataclass
class InLoopEvalConfig:
    tasks: list[str] = field(default_factory=list)  # downstream task names
    limit: int = 100  # instances per task, always the same ones
    ppl_documents: list[str] = field(default_factory=list)  # Dolma document globs for bits per byte
    max_ppl_documents: int = 200
    batch_size: int = 16


def build_inloop_evaluators(config: InLoopEvalConfig, tokenizer) -> list[MetricsFn]:
    evaluators: list[MetricsFn] = []
    return evaluators
