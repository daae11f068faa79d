"""Generative tasks: greedy generation with the model's KV-cache generator, then an answer checker.

Prompts longer than the model allows are cut from the left (counted) so that the prompt plus the new tokens
fit; a model whose context is too short for the task's `max_new_tokens` generates at most half its context.
With `chat`, each prompt is the user message of the model's chat template (few-shot examples and all, in one
turn, as lm-eval's `--apply_chat_template` without `--fewshot_as_multiturn`), ending where the reply begins.
"""

from __future__ import annotations

from typing import Callable

from lmforge.eval import answers
from lmforge.eval.tasks import GenInstance
from lmforge.model.generation import SamplingConfig, chat_prompt, cut_at_stop, generate_ids, prompt_ids

CHECKERS: dict[str, Callable[[str, str], bool]] = {
    "gsm8k": answers.gsm8k_is_correct,
    "math": answers.math_is_correct,
    "exact": lambda generation, gold: generation.strip() == gold.strip(),
}
EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "gsm8k": answers.gsm8k_answer,
    "math": answers.math_answer,
    "exact": lambda generation: generation.strip(),
}


def generate_answers(model, tokenizer, instances: list[GenInstance], checker: str, stop: list[str],
                     max_new_tokens: int, batch_size: int = 8,
                     progress: Callable[[int], None] | None = None, chat: bool = False) -> list[dict]:
    """One record per instance: generation, extracted answer, correctness, whether the prompt was cut."""
    context = model.config.max_sequence_length
    new_tokens = min(max_new_tokens, context // 2)
    room = context - new_tokens
    prompts, cut = [], []
    for inst in instances:
        text = chat_prompt(tokenizer, inst.context.rstrip()) if chat else inst.context
        ids = prompt_ids(tokenizer, text, model.config.bos_token_id)
        cut.append(len(ids) > room)
        prompts.append(ids[-room:])
    config = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0, stop_strings=list(stop), stop_on_eos=True)
    texts: list[str] = [""] * len(instances)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for s in range(0, len(order), batch_size):
        batch = order[s:s + batch_size]
        outputs = generate_ids(model, [prompts[i] for i in batch], config, eos_id=tokenizer.eos_id,
                               pad_id=tokenizer.pad_id, decode=tokenizer.decode)
        for i, ids in zip(batch, outputs):
            if ids and ids[-1] == tokenizer.eos_id:
                ids = ids[:-1]
            texts[i] = cut_at_stop(tokenizer.decode(ids), list(stop))
        if progress is not None:
            progress(len(batch))
    check, extract = CHECKERS[checker], EXTRACTORS[checker]
    return [{"id": inst.id, "group": inst.group, "generation": text, "answer": extract(text), "gold": inst.answer,
             "correct": bool(check(text, inst.answer)), "truncated": c}
            for inst, text, c in zip(instances, texts, cut)]
