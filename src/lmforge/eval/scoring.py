"""Rank classification: log-likelihoods of continuations given contexts, normalised scores, accuracies.

`loglikelihoods` scores (context ids, continuation ids) pairs. LL = Σ log p(continuation token | everything
before it), from the forward pass over context + continuation[:-1], in fp32 log-softmax. Pairs that share a
context share its forward pass: the context runs once (left-padded with a batch of other contexts) into a KV
cache, its last position scores every continuation's first token, and only continuations of two or more
tokens run a second, short pass on top of copies of that cache. Single-token continuations (MC letters,
" yes"/" no") therefore cost nothing beyond the context. A context that does not fit the model is cut from
the left so that context + continuation - 1 fits (per pair, as lm-eval does); such pairs are counted.

Normalisations (the score whose argmax is the prediction; ties go to the first choice):
    none              LL
    per_token         LL / continuation tokens
    per_char          LL / len(continuation), the leading space counted (OLMES, catwalk, olmo_eval v2)
    per_char_nospace  LL / len(continuation without its leading space) (lm-eval acc_norm, olmo_eval v1)
    per_byte          LL / UTF-8 bytes without the leading space (lm-eval acc_bytes)
    pmi               LL(continuation | context) - LL(continuation | "Answer:") (catwalk/OLMES acc_uncond)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lmforge.core.errors import LmforgeError
from lmforge.model.generation import left_padded, mask_positions
from lmforge.model.transformer import KVCache

Pair = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass
class LoglikelihoodResult:
    loglikelihoods: list[float]
    truncated: list[bool]  # the context of this pair was cut from the left to fit the model


@contextlib.contextmanager
def logits_at(model, select: Callable[[torch.Tensor], torch.Tensor]):
    """Apply the LM head only to `select(hidden states)`: the (batch, length, vocabulary) logits of padding
    and of positions nobody reads would dominate the time and memory of scoring."""
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: (select(args[0]),))
    try:
        yield
    finally:
        handle.remove()


def last_position_logits(model):
    return logits_at(model, lambda h: h[:, -1:])


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Log-softmax in fp32 for bf16/fp16 models (as lm-eval's softmax_dtype=float32), fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) = logit - logsumexp(logits), never `log_softmax`: torch's CPU fp32 log_softmax (and
    cross_entropy) sums the exponentials sequentially and drops the small ones, so over SmolLM2's 49,152-token
    vocabulary each log-probability comes out 8e-6 too high on average (up to 1.7e-5), a bias that grows with
    a continuation's length; logsumexp sums pairwise and is within 2e-6 of fp64 (docs/evaluation.md)."""
    logits = at_least_fp32(logits)
    return logits.gather(-1, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def loglikelihoods(model, pairs: Sequence[Pair], batch_size: int = 16,
                   progress: Callable[[int], None] | None = None) -> LoglikelihoodResult:
    """LL of each (context, continuation) pair; contexts must be non-empty (prefix EOS/BOS for none)."""
    max_len = model.config.max_sequence_length
    groups: dict[tuple[int, ...], list[int]] = {}
    truncated = [False] * len(pairs)
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise LmforgeError("every scored pair needs a non-empty context and continuation")
        if len(cont) > max_len:
            raise LmforgeError(f"a continuation of {len(cont)} tokens does not fit the model's context of {max_len}")
        # Left truncation per pair (as lm-eval): pairs whose cut contexts differ no longer share a pass.
        room = max_len + 1 - len(cont)
        truncated[i] = len(ctx) > room
        groups.setdefault(tuple(ctx[-room:]), []).append(i)
    results = [0.0] * len(pairs)
    # Longest first: the first batch shows memory problems at once, and similar lengths batch together.
    order = sorted(groups, key=lambda c: (-(len(c) + max(len(pairs[i][1]) for i in groups[c])), c))
    for start in range(0, len(order), batch_size):
        contexts = order[start:start + batch_size]
        members = [groups[c] for c in contexts]
        _score_batch(model, contexts, [[pairs[i][1] for i in idx] for idx in members], members, results)
        if progress is not None:
            progress(sum(len(m) for m in members))
    return LoglikelihoodResult(results, truncated)


def _score_batch(model, contexts: list[tuple[int, ...]], continuations: list[list[tuple[int, ...]]],
                 members: list[list[int]], results: list[float]) -> None:
    device, dtype = _model_device_dtype(model)
    B, Lc = len(contexts), max(len(c) for c in contexts)
    ids, mask = left_padded([list(c) for c in contexts], model.config.pad_token_id, device)
    padded = bool((mask == 0).any())
    positions = mask_positions(mask)
    cache = KVCache(model.config, B, Lc, device, dtype)
    with last_position_logits(model):
        logits = model(ids, positions=positions, attention_mask=mask if padded else None, cache=cache)
    firsts = [(b, cont, i) for b, (conts, idx) in enumerate(zip(continuations, members)) for cont, i in zip(conts, idx)]
    source = torch.tensor([b for b, _, _ in firsts], device=device)
    first_tokens = torch.tensor([cont[0] for _, cont, _ in firsts], device=device)
    first_logprobs = token_logprobs(logits[:, -1].index_select(0, source), first_tokens).double().cpu()
    rows = []  # (batch row, continuation, result index) for continuations longer than one token
    for (b, cont, i), logprob in zip(firsts, first_logprobs.tolist()):
        results[i] = logprob
        if len(cont) > 1:
            rows.append((b, cont, i))
    chunk = max(1, 4 * B)
    for s in range(0, len(rows), chunk):
        _score_tails(model, cache, mask, rows[s:s + chunk], results)


def _score_tails(model, ctx_cache: KVCache, ctx_mask: torch.Tensor, rows, results: list[float]) -> None:
    """Second pass: continuation[:-1] on top of each context's cache, scoring continuation[1:]."""
    device = ctx_mask.device
    R, Lc = len(rows), ctx_mask.shape[1]
    Lt = max(len(cont) - 1 for _, cont, _ in rows)
    source = torch.tensor([b for b, _, _ in rows], device=device)
    cache = ctx_cache.select(source, Lc + Lt)
    ids = torch.full((R, Lt), model.config.pad_token_id, dtype=torch.long)
    targets = torch.zeros((R, Lt), dtype=torch.long)
    for r, (_, cont, _) in enumerate(rows):
        ids[r, :len(cont) - 1] = torch.tensor(cont[:-1])
        targets[r, :len(cont) - 1] = torch.tensor(cont[1:])
    ids, targets = ids.to(device), targets.to(device)
    row_mask = ctx_mask.index_select(0, source)
    ctx_lengths = row_mask.sum(-1, keepdim=True)
    positions = ctx_lengths + torch.arange(Lt, device=device)[None, :]
    # Padding after a continuation is never attended by its real tokens (causal), so the mask only hides
    # the contexts' left padding.
    mask = torch.cat([row_mask, torch.ones((R, Lt), dtype=row_mask.dtype, device=device)], dim=1)
    lengths = torch.tensor([len(cont) - 1 for _, cont, _ in rows], device=device)
    real = torch.arange(Lt, device=device)[None, :] < lengths[:, None]
    with logits_at(model, lambda h: h[real]):
        logits = model(ids, positions=positions, attention_mask=mask, cache=cache)
    logprobs = token_logprobs(logits, targets[real]).double().cpu()
    offsets = [0] + torch.cumsum(lengths, 0).tolist()
    for r, (_, _, i) in enumerate(rows):
        results[i] += float(logprobs[offsets[r]:offsets[r + 1]].sum())


# ---------------------------------------------------------------------------------------------- normalisation

@dataclass
class ChoiceStats:
    """What each normalisation needs about one scored continuation."""

    ll: float
    n_tokens: int
    text: str
    ll_uncond: float | None = None

    @property
    def chars(self) -> int:
        return len(self.text)

    @property
    def chars_nospace(self) -> int:
        return len(strip_leading_space(self.text))

    @property
    def bytes_nospace(self) -> int:
        return len(strip_leading_space(self.text).encode("utf-8"))

    @property
    def bytes(self) -> int:
        return len(self.text.encode("utf-8"))


def strip_leading_space(text: str) -> str:
    return text[1:] if text[:1] == " " else text


def normalized_score(c: ChoiceStats, normalization: str) -> float:
    if normalization == "none":
        return c.ll
    if normalization == "per_token":
        return c.ll / max(c.n_tokens, 1)
    if normalization == "per_char":
        return c.ll / max(c.chars, 1)
    if normalization == "per_char_nospace":
        return c.ll / max(c.chars_nospace, 1)
    if normalization == "per_byte":
        return c.ll / max(c.bytes_nospace, 1)
    if normalization == "pmi":
        if c.ll_uncond is None:
            raise ValueError("pmi needs the unconditional log-likelihood")
        return c.ll - c.ll_uncond
    raise ValueError(f"unknown normalization {normalization!r}")


def predict(choices: list[ChoiceStats], normalization: str) -> tuple[int, list[float]]:
    """Index of the best choice (the first on ties) and the scores."""
    scores = [normalized_score(c, normalization) for c in choices]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return best, scores


def gold_bits_per_byte(lls: list[float], byte_counts: list[int]) -> float:
    """Σ -LL / (ln 2 · Σ bytes) over gold continuations."""
    total_bytes = sum(byte_counts)
    return -math.fsum(lls) / (math.log(2) * total_bytes) if total_bytes else float("nan")
