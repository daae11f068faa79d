"""Paloma-style perplexity: bits per byte per domain, macro-averaged over the domains of each source.

Each document is scored on its own (never concatenated with another) in disjoint windows of the model's
context, as lm-eval's `loglikelihood_rolling` and catwalk's Paloma runner do: the first window predicts the
first `max_len` tokens conditioned on EOS (BOS when the model has one), each later window predicts the next
`max_len` tokens conditioned on the one token before them, and the last, shorter window keeps a full context
of earlier tokens. Every token is predicted exactly once.

    domain bits per byte = Σ_docs -LL (nats) / (ln 2 · Σ_docs UTF-8 bytes)
    source bits per byte = mean over the source's domains (macro), plus the micro total over its documents
A document's source is its `source` field (else the file name); its domain is `metadata.subdomain`, else
`subdomain`, else the source.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from lmforge.curation.documents import ReadReport, read_documents, strip_suffix
from lmforge.eval.scoring import at_least_fp32, logits_at


@dataclass
class Window:
    doc: int
    tokens: list[int]  # model input = tokens[:-1]
    n_predicted: int  # the last n_predicted of tokens[1:] are scored


def rolling_windows(doc_index: int, tokens: list[int], prefix: int, max_len: int) -> list[Window]:
    """Disjoint prediction windows (lm-eval `get_rolling_token_windows` with context_len=1, made disjoint)."""
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [Window(doc_index, [prefix] + tokens[:first], first)]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_len)
        end = predicted + n
        # end > max_len here, so the window always holds max_len tokens of input.
        windows.append(Window(doc_index, tokens[end - max_len - 1:end], n))
        predicted = end
    return windows


@torch.no_grad()
def window_loglikelihoods(model, windows: list[Window], batch_size: int = 8,
                          progress: Callable[[int], None] | None = None) -> list[float]:
    """Summed log-probability of each window's predicted tokens, batched by length with right padding."""
    device = next(model.parameters()).device
    out = [0.0] * len(windows)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].tokens))
    for s in range(0, len(order), batch_size):
        batch = order[s:s + batch_size]
        L = max(len(windows[i].tokens) - 1 for i in batch)
        ids = torch.full((len(batch), L), model.config.pad_token_id, dtype=torch.long)
        targets = torch.zeros((len(batch), L), dtype=torch.long)
        for r, i in enumerate(batch):
            t = windows[i].tokens
            ids[r, :len(t) - 1] = torch.tensor(t[:-1])
            targets[r, :len(t) - 1] = torch.tensor(t[1:])
        # Right padding never reaches a real token through causal attention, so no mask is needed; the LM
        # head runs on the predicted positions only.
        scored = torch.zeros((len(batch), L), dtype=torch.bool)
        for r, i in enumerate(batch):
            length = len(windows[i].tokens) - 1
            scored[r, length - windows[i].n_predicted:length] = True
        scored = scored.to(device)
        with logits_at(model, lambda h: h[scored]):
            logits = at_least_fp32(model(ids.to(device)))
        picked = targets.to(device)[scored]
        logprobs = (logits.gather(-1, picked[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)).double().cpu()
        counts = [windows[i].n_predicted for i in batch]
        offsets = [0] + torch.cumsum(torch.tensor(counts), 0).tolist()
        for r, i in enumerate(batch):
            out[i] = float(logprobs[offsets[r]:offsets[r + 1]].sum())
        if progress is not None:
            progress(len(batch))
    return out


@dataclass
class DomainTotals:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    nll: list[float] = field(default_factory=list)  # nats per document, summed with fsum at the end

    def as_dict(self) -> dict:
        nll = math.fsum(self.nll)
        row = {"documents": self.documents, "tokens": self.tokens, "bytes": self.bytes, "nll_nats": nll,
               "bits_per_byte": nll / (math.log(2) * self.bytes) if self.bytes else None,
               "token_perplexity": math.exp(nll / self.tokens) if self.tokens else None}
        if not self.bytes:  # null, not NaN: results.json stays JSON
            row["note"] = "no text to score: every document is empty"
        return row


def document_source_domain(doc: dict, path: str) -> tuple[str, str]:
    source = doc.get("source") or Path(strip_suffix(path)).name
    metadata = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    domain = metadata.get("subdomain") or doc.get("subdomain") or source
    return str(source), str(domain)


def collect_documents(paths: Iterable[str], max_documents: int | None,
                      report: ReadReport) -> list[tuple[str, str, str]]:
    """(source, domain, text) of the documents to score, in file order; at most `max_documents` from each
    file, so that every source (typically one held-out file or directory each) is represented."""
    docs = []
    for path in paths:
        taken = 0
        for _, doc in read_documents(path, report):
            if max_documents is not None and taken >= max_documents:
                break
            docs.append((*document_source_domain(doc, path), doc["text"]))
            taken += 1
    return docs


def perplexity(model, tokenizer, documents: list[tuple[str, str, str]], batch_size: int = 8,
               progress: Callable[[int], None] | None = None) -> dict:
    """Per-domain and per-source bits per byte of (source, domain, text) documents."""
    max_len = model.config.max_sequence_length
    prefix = model.config.bos_token_id if model.config.bos_token_id is not None else tokenizer.eos_id
    texts = [t for _, _, t in documents]
    token_lists = tokenizer.encode_batch(texts) if texts else []
    windows = []
    for d, tokens in enumerate(token_lists):
        windows.extend(rolling_windows(d, tokens, prefix, max_len))
    lls = window_loglikelihoods(model, windows, batch_size, progress)
    per_doc: dict[int, list[float]] = defaultdict(list)
    for w, ll in zip(windows, lls):
        per_doc[w.doc].append(ll)
    domains: dict[tuple[str, str], DomainTotals] = defaultdict(DomainTotals)
    for d, (source, domain, text) in enumerate(documents):
        totals = domains[(source, domain)]
        totals.documents += 1
        totals.tokens += len(token_lists[d])
        totals.bytes += len(text.encode("utf-8"))
        totals.nll.append(-math.fsum(per_doc.get(d, [])))
    return summarize(domains)


def summarize(domains: dict[tuple[str, str], DomainTotals]) -> dict:
    by_source: dict[str, dict[str, DomainTotals]] = defaultdict(dict)
    for (source, domain), totals in sorted(domains.items()):
        by_source[source][domain] = totals
    sources = {}
    all_totals = DomainTotals()
    for source, doms in by_source.items():
        micro = DomainTotals()
        for t in doms.values():
            micro.documents += t.documents
            micro.tokens += t.tokens
            micro.bytes += t.bytes
            micro.nll.extend(t.nll)
        all_totals.documents += micro.documents
        all_totals.tokens += micro.tokens
        all_totals.bytes += micro.bytes
        all_totals.nll.extend(micro.nll)
        domain_rows = {d: t.as_dict() for d, t in doms.items()}
        valid = [r["bits_per_byte"] for r in domain_rows.values() if r["bytes"]]
        sources[source] = {"bits_per_byte_macro": sum(valid) / len(valid) if valid else None,
                           "micro": micro.as_dict(), "domains": domain_rows}
    return {"sources": sources, "total": all_totals.as_dict()}
