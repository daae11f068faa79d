"""Text generation with a KV cache: greedy, temperature, top-k, top-p; batches of prompts with left padding.

Positions follow the attention mask (the first real token of a left-padded prompt is position 0), as in
transformers, so a batch generates the same tokens as each prompt alone.
"""

from __future__ import annotations


import torch

from lmforge.core.errors import LmforgeError
from lmforge.model.sampling import SamplingConfig
from lmforge.model.transformer import KVCache, Transformer


def next_token(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from (B, V) logits."""
    if config.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose probability mass reaches top_p (always at least one token).
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= config.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(model: Transformer, prompts: list[list[int]], config: SamplingConfig,
                 eos_id: int | None = None, pad_id: int = 0, decode=None,
                 logprobs: list[list[float]] | None = None) -> list[list[int]]:
    """New token ids for each prompt (without the prompt), stopped at EOS (kept) or a stop string.

    `decode(ids) -> str` is needed for stop strings; text is cut at the stop string by the caller. A list given
    as `logprobs` receives, per prompt, the log-probability of each new token under the sampler's tempered
    distribution (before top-k/top-p), as the sampler computed it (RL's importance weights compare it with
    the learner's)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LmforgeError("every prompt needs at least one token")
    context = model.config.max_sequence_length
    longest = max(len(p) for p in prompts)
    if longest > context:
        raise LmforgeError(f"prompt of {longest} tokens is longer than the model's context ({context})")
    max_new = min(config.max_new_tokens, context - longest)
    device = next(model.parameters()).device
    B = len(prompts)
    ids = torch.full((B, longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, longest + max_new), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        mask[i, longest - len(p):longest] = 1
    positions = (mask[:, :longest].cumsum(-1) - 1).clamp(min=0)
    generator = torch.Generator(device=device).manual_seed(config.seed) if config.temperature > 0 else None
    cache = KVCache(model.config, B, longest + max_new, device, next(model.parameters()).dtype) if config.use_cache else None

    outputs: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    sequence = ids
    step_ids, step_pos = ids, positions
    for step in range(max_new):
        length = longest + step
        if cache is not None:
            logits = model(step_ids, positions=step_pos, attention_mask=mask[:, :length], cache=cache)
        else:
            all_pos = (mask[:, :length].cumsum(-1) - 1).clamp(min=0)
            logits = model(sequence, positions=all_pos, attention_mask=mask[:, :length])
        token = next_token(logits[:, -1], config, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        if logprobs is not None:
            tempered = logits[:, -1].float() / (config.temperature if config.temperature > 0 else 1.0)
            chosen = tempered.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1).tolist()
            if not logprobs:
                logprobs.extend([] for _ in range(B))
        for i in range(B):
            if not done[i]:
                outputs[i].append(int(token[i]))
                if logprobs is not None:
                    logprobs[i].append(chosen[i])
        if config.stop_on_eos and eos_id is not None:
            done |= token == eos_id
        if config.stop_strings and decode is not None:
            for i in range(B):
                if not done[i] and any(s in decode(outputs[i]) for s in config.stop_strings):
                    done[i] = True
        if bool(done.all()):
            break
        mask[:, length] = 1
        step_ids = token[:, None]
        step_pos = step_pos[:, -1:] + 1
        sequence = torch.cat([sequence, step_ids], dim=1)
    return outputs


def cut_at_stop(text: str, stop_strings: list[str]) -> str:
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def generate_text(model: Transformer, tokenizer, prompts: list[str], config: SamplingConfig) -> list[str]:
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    if model.config.bos_token_id is not None:
        prompt_ids = [[model.config.bos_token_id] + p for p in prompt_ids]
    out = generate_ids(model, prompt_ids, config, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                       decode=tokenizer.decode)
    texts = []
    for ids in out:
        if ids and ids[-1] == tokenizer.eos_id and config.stop_on_eos:
            ids = ids[:-1]
        texts.append(cut_at_stop(tokenizer.decode(ids), config.stop_strings))
    return texts
