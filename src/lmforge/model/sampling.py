"""How to sample a continuation. Kept apart from `generation.py` (which needs torch) so that the command line
can build its flags from it without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.core.config import require


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    stop_strings: list[str] = field(default_factory=list)
    stop_on_eos: bool = True
    seed: int = 0
    use_cache: bool = True
    token_healing: bool = False  # text prompts only: see `generation.heal_prompts`

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(self.max_new_tokens >= 0, "max_new_tokens", self.max_new_tokens, "must be >= 0")
        require(0 <= self.temperature < float("inf"), "temperature", self.temperature,  # NaN fails too
                "must be >= 0 and finite (0 = greedy)")
        require(self.top_k is None or self.top_k >= 1, "top_k", self.top_k, "must be >= 1")
        require(self.top_p is None or 0 < self.top_p <= 1, "top_p", self.top_p, "must be in (0, 1]")
