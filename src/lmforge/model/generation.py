"""Text generation with a KV cache: greedy, temperature, top-k, top-p; batches of prompts with left padding.

Positions follow the attention mask (the first real token of a left-padded prompt is position 0), as in
transformers, so a batch generates the same tokens as each prompt alone. Tokens come out step by step
(`generate_steps`); `TextStream` turns them into text as soon as the text is final, for streaming. Text prompts
can be healed at their boundary (`heal_prompts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

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


@dataclass
class Healing:
    """What `heal_prompts` took back from each prompt: its text ("" for a prompt left whole), and the tokens
    the first new token may be (None: any)."""
    texts: list[str]
    allowed: list[list[int] | None]

    def first_token_mask(self, vocab_size: int, device) -> torch.Tensor:
        """(B, vocab_size) bool: True where a row's first new token may be that token."""
        mask = torch.ones((len(self.texts), vocab_size), dtype=torch.bool)
        for row, allowed in enumerate(self.allowed):
            if allowed is not None:
                mask[row] = False
                mask[row, allowed] = True
        return mask.to(device)


def heal_prompts(tokenizer, prompts: list[list[int]]) -> tuple[list[list[int]], Healing]:
    """Token healing (the prompt-boundary fix of Microsoft's `guidance`): each prompt's last token is taken back
    and the first new token must begin with its text, so the model chooses how the prompt's text ends. Without
    it, a prompt ending in "\n" ends on the token of a newline *not* followed by spaces (byte-level BPE merges
    "\n" with the indentation after it), which tells the model the next line starts at column 0. A prompt of
    one token, a special token or a broken character is left whole."""
    healed, texts, allowed = [], [], []
    for ids in prompts:
        text = tokenizer.decode(ids[-1:])
        extending = tokenizer.tokens_extending(ids[-1]) if len(ids) > 1 and "\ufffd" not in text else []
        healed.append(ids[:-1] if extending else ids)
        texts.append(text if extending else "")
        allowed.append(extending or None)
    return healed, Healing(texts, allowed)


def generate_ids(model: Transformer, prompts: list[list[int]], config: SamplingConfig,
                 eos_id: int | None = None, pad_id: int = 0, decode=None,
                 logprobs: list[list[float]] | None = None) -> list[list[int]]:
    """New token ids for each prompt (without the prompt), stopped at EOS (kept) or a stop string.

    `decode(ids) -> str` is needed for stop strings; text is cut at the stop string by the caller. A list given
    as `logprobs` receives, per prompt, the log-probability of each new token under the sampler's tempered
    distribution (before top-k/top-p), as the sampler computed it (RL's importance weights compare it with
    the learner's)."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in generate_steps(model, prompts, config, eos_id, pad_id, decode, logprobs):
        for row, token in enumerate(step):
            if token is not None:
                outputs[row].append(token)
    return outputs


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, longest) token ids with each prompt at the right end, and its attention mask (1 on real tokens)."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, longest - len(p):] = 1
    return ids.to(device), mask.to(device)


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Token positions from an attention mask: the first real token of each row is position 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _prefill(model: Transformer, prompts: list[list[int]], ids: torch.Tensor, mask: torch.Tensor,
             capacity: int) -> tuple[torch.Tensor, KVCache]:
    """The prompts' last-position logits and a cache of `capacity` tokens holding them. Each distinct prompt runs
    once and its cache is copied to the rows that repeat it: GRPO samples a group of completions per prompt."""
    distinct: dict[tuple[int, ...], int] = {}
    first, source = [], []
    for row, p in enumerate(prompts):
        if distinct.setdefault(tuple(p), len(first)) == len(first):
            first.append(row)
        source.append(distinct[tuple(p)])
    repeated = len(first) < len(prompts)
    cache = KVCache(model.config, len(first), ids.shape[1] if repeated else capacity, ids.device,
                    next(model.parameters()).dtype)
    rows = torch.tensor(first, device=ids.device)
    logits = model(ids[rows], positions=mask_positions(mask[rows]), attention_mask=mask[rows], cache=cache,
                   last_logits_only=True)
    if not repeated:
        return logits, cache
    source_rows = torch.tensor(source, device=ids.device)
    return logits.index_select(0, source_rows), cache.select(source_rows, capacity)


@torch.no_grad()
def generate_steps(model: Transformer, prompts: list[list[int]], config: SamplingConfig,
                   eos_id: int | None = None, pad_id: int = 0, decode=None,
                   logprobs: list[list[float]] | None = None,
                   healing: Healing | None = None) -> Iterator[list[int | None]]:
    """`generate_ids` one step at a time: each step's new token per prompt, None for a prompt already done.
    With `healing` (from `heal_prompts`), the first token extends the text taken back from the prompt, and stop
    strings are looked for after that text."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LmforgeError("every prompt needs at least one token")
    context = model.config.max_sequence_length
    longest = max(len(p) for p in prompts)
    if longest > context:
        raise LmforgeError(f"prompt of {longest} tokens is longer than the model's context ({context})")
    max_new = min(config.max_new_tokens, context - longest)
    device = next(model.parameters()).device
    B = len(prompts)
    ids, prompt_mask = left_padded(prompts, pad_id, device)
    mask = torch.cat([prompt_mask, torch.zeros((B, max_new), dtype=torch.long, device=device)], dim=1)
    generator = torch.Generator(device=device).manual_seed(config.seed) if config.temperature > 0 else None
    cache = None
    if config.use_cache:
        logits, cache = _prefill(model, prompts, ids, prompt_mask, longest + max_new)

    outputs: list[list[int]] = [[] for _ in range(B)]  # for the stop strings
    done = [False] * B
    sequence = ids
    step_ids, step_pos = ids, mask_positions(prompt_mask)
    for step in range(max_new):
        length = longest + step
        if cache is None:
            logits = model(sequence, positions=mask_positions(mask[:, :length]), attention_mask=mask[:, :length],
                           last_logits_only=True)
        elif step > 0:
            logits = model(step_ids, positions=step_pos, attention_mask=mask[:, :length], cache=cache,
                           last_logits_only=True)
        if step == 0 and healing is not None:
            logits = logits.masked_fill(~healing.first_token_mask(logits.shape[-1], device)[:, None], float("-inf"))
        token = next_token(logits[:, -1], config, generator)
        tokens = token.tolist()  # one device-to-host copy per step
        if logprobs is not None:
            tempered = logits[:, -1].float() / (config.temperature if config.temperature > 0 else 1.0)
            chosen = tempered.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1).tolist()
            if not logprobs:
                logprobs.extend([] for _ in range(B))
        new: list[int | None] = [None if done[i] else tokens[i] for i in range(B)]
        for i, t in enumerate(new):
            if t is None:
                continue
            outputs[i].append(t)
            if logprobs is not None:
                logprobs[i].append(chosen[i])
            if config.stop_on_eos and eos_id is not None and t == eos_id:
                done[i] = True
            elif config.stop_strings and decode is not None and any(
                    s in decode(outputs[i])[len(healing.texts[i]) if healing else 0:] for s in config.stop_strings):
                done[i] = True
        yield new
        if all(done):
            break
        mask[:, length] = 1
        step_ids = torch.tensor([[pad_id if t is None else t] for t in new], dtype=torch.long, device=device)
        step_pos = step_pos[:, -1:] + 1
        if cache is None:
            sequence = torch.cat([sequence, step_ids], dim=1)


def cut_at_stop(text: str, stop_strings: list[str]) -> str:
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


class TextStream:
    """The text of one prompt's generated tokens, handed out as soon as it is final: while the text ends inside
    a multi-byte character (decoded as U+FFFD) it waits for the rest, the last characters that could begin a
    stop string wait until that is decided, and EOS is not text. The pieces join to `generate_text`'s output.
    `healed` is prompt text the tokens restate (`heal_prompts`): it is not handed out."""

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: list[str] = (), eos_id: int | None = None,
                 healed: str = ""):
        self.stop_strings, self.eos_id = list(stop_strings), eos_id
        self.decode = (lambda ids: decode(ids)[len(healed):]) if healed else decode
        self.ids: list[int] = []
        self.sent = 0  # characters handed out
        self.hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self.stopped = False

    def push(self, token: int) -> str:
        """The newly final text after `token` ("" while it waits)."""
        if self.stopped or token == self.eos_id:
            self.stopped = True
            return ""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        cut = cut_at_stop(text, self.stop_strings)
        self.stopped = len(cut) < len(text)
        return self._send(cut if self.stopped else text[:len(text) - self.hold])

    def finish(self) -> str:
        """What is left once generation has ended."""
        return self._send(cut_at_stop(self.decode(self.ids), self.stop_strings))

    def _send(self, text: str) -> str:
        piece = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return piece


def prompt_ids(tokenizer, text: str, bos_id: int | None) -> list[int]:
    """A prompt's tokens as the model reads them: BOS first when the model has one (once: a chat template may
    already have written it)."""
    ids = tokenizer.encode(text)
    return [bos_id] + ids if bos_id is not None and ids[:1] != [bos_id] else ids


def chat_prompt(tokenizer, message: str) -> str:
    """A user message as the tokenizer's chat template renders it, ending where the assistant's reply begins."""
    return tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)


def generate_text(model: Transformer, tokenizer, prompts: list[str], config: SamplingConfig,
                  on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """The completion of each prompt (EOS and anything from a stop string on removed). `on_text(row, piece)`
    receives each row's text as it becomes final (`TextStream`). `config.token_healing` heals the prompts'
    boundaries (`heal_prompts`)."""
    ids = [prompt_ids(tokenizer, p, model.config.bos_token_id) for p in prompts]
    healing = None
    if config.token_healing:
        ids, healing = heal_prompts(tokenizer, ids)
    streams = [TextStream(tokenizer.decode, config.stop_strings, tokenizer.eos_id if config.stop_on_eos else None,
                          healing.texts[row] if healing else "") for row in range(len(prompts))]
    pieces: list[list[str]] = [[] for _ in prompts]

    def give(row: int, piece: str) -> None:
        if piece:
            pieces[row].append(piece)
            if on_text is not None:
                on_text(row, piece)

    for step in generate_steps(model, ids, config, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                               decode=tokenizer.decode, healing=healing):
        for row, token in enumerate(step):
            if token is not None:
                give(row, streams[row].push(token))
    for row, stream in enumerate(streams):
        give(row, stream.finish())
    return ["".join(p) for p in pieces]
