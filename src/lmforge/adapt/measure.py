"""Before/after measurement of an adapted model on held-out verifiable items (`lmforge adapt score`).

Each item is an RLVR prompt record ({"prompt" or "messages", "answer" or "ground_truth"}, docs/adapt.md),
rendered as RLVR renders it (the tokenizer's chat template with its generation prompt when it has one), answered
greedily with lmforge's KV-cache generation, and scored by the RLVR reward (`rewards.RewardFunction`: the same
checker, so a training reward and a held-out reward mean the same thing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.adapt.rewards import RewardConfig, RewardFunction
from lmforge.adapt.rlvr import completion_texts, prompt_set, read_prompts
from lmforge.adapt.templates import chat_tokenizer
from lmforge.core.errors import LmforgeError
from lmforge.model.generation import generate_ids
from lmforge.model.loading import load
from lmforge.model.sampling import SamplingConfig


@dataclass
class ItemScores:
    correct: int  # items the checker gave full credit
    total: int  # items scored (unusable records are skipped and counted on stderr)
    mean_reward: float
    prompts: list[str] = field(repr=False)  # each item's prompt as the model read it (chat-formatted)
    completions: list[str] = field(repr=False)
    rewards: list[float] = field(repr=False)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    def summary(self) -> str:
        return f"{self.correct}/{self.total} correct ({self.accuracy:.3f}), mean reward {self.mean_reward:.3f}"


def evaluate_on_items(model_dir: str | Path, items: str | Path | list[dict], checker: str = "gsm8k",
                      max_new_tokens: int = 32, batch_size: int = 16, limit: int | None = None,
                      max_prompt_tokens: int = 512, template: str | None = None) -> ItemScores:
    """Greedy answers of the model at `model_dir` (any form `lmforge.model.loading.load` reads) to `items` (a
    JSONL prompt file or a list of prompt records; the first `limit`), scored by `checker` (`gsm8k`, `math`
    or a dotted path, as `reward.checker` in RLVR), with `template` (a name as in SFT) in place of the
    model's own chat template when given."""
    if limit is not None and limit < 1 or batch_size < 1:
        raise LmforgeError(f"limit ({limit}) and batch size ({batch_size}) must be >= 1")
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    loaded = load(model_dir, require_tokenizer=True)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    if template is not None:
        tokenizer = chat_tokenizer(tokenizer, template)
    if isinstance(items, (str, Path)):
        prompts = read_prompts([str(items)], tokenizer, "auto", max_prompt_tokens, model.config.bos_token_id)
    else:
        prompts = prompt_set(((f"item {i + 1}", r) for i, r in enumerate(items)), tokenizer, "auto",
                             max_prompt_tokens, model.config.bos_token_id, "the items given")
    n = len(prompts.ids) if limit is None else min(limit, len(prompts.ids))
    completions: list[list[int]] = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            completions += generate_ids(model, prompts.ids[start:min(start + batch_size, n)], greedy,
                                        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    texts, _ = completion_texts(tokenizer, completions)
    reward = RewardFunction(RewardConfig(checker=checker))
    try:
        scored = reward(texts, prompts.answers[:n], prompts.where[:n])
    finally:
        reward.close()
    return ItemScores(correct=sum(scored.correct), total=n, mean_reward=sum(scored.rewards) / n,
                      prompts=[tokenizer.decode(ids) for ids in prompts.ids[:n]], completions=texts,
                      rewards=scored.rewards)
