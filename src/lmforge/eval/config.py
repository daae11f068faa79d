"""What `lmforge eval` evaluates. Kept apart from `evaluate.py` (which needs torch) so that the command line
can build its flags from it without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmforge.core.config import require


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=list)
    suite: Literal["olmo1", "olmes", "core"] | None = None
    regime: Literal["olmo1", "olmes"] | None = None  # default: the suite's, else olmes
    limit: int | None = None  # instances per task (per formulation)
    ppl: list[str] = field(default_factory=list)  # Dolma document globs
    ppl_max_documents: int | None = None
    ppl_stride: int | None = None  # tokens between perplexity windows; None: half the model's context
    batch_size: int = 16
    all_norms: bool = False  # also report PMI accuracy for tasks whose rule is not PMI (one more pass)
    max_new_tokens: int | None = None  # override the generative tasks' budget
    chat: bool = False  # generative prompts through the model's chat template (rank classification unchanged)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(bool(self.tasks or self.suite or self.ppl), "tasks", self.tasks,
                "nothing to evaluate: give tasks, a suite and/or ppl documents")
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be at least 1")
        for name in ("limit", "ppl_max_documents", "ppl_stride", "max_new_tokens"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, value, "must be at least 1")
