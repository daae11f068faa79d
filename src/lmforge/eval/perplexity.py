"""Paloma-style perplexity: bits per byte per domain, macro-averaged over the domains of each source.

Each document is scored on its own (never concatenated with another) with a sliding window of the model's
context L and a stride S (default L // 2; `--ppl-stride`), as in the Hugging Face perplexity guide: the first
window predicts the first L tokens conditioned on EOS (BOS when the model has one); each later window predicts
the next S tokens (fewer at the end), its input being the L tokens that end at its last prediction. Every
token is predicted exactly once, and a token predicted by a later window sees at least L - S + 1 earlier
tokens. S = L gives lm-eval's `loglikelihood_rolling` (disjoint windows, the last one with a full context), the
convention of catwalk's Paloma runner; a document shorter than the context is one window whatever S is.
Compute grows as L / S, and memory is a few bytes per token: documents are encoded in pieces
(`tokens.tokenizer.encode_stream`) into numpy arrays, and windows are positions into them.

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

import numpy as np
import torch

from lmforge.core.errors import LmforgeError
from lmforge.curation.documents import ReadReport, read_documents, strip_suffix, text_bytes
from lmforge.eval.scoring import logits_at, token_logprobs
from lmforge.tokens.tokenizer import encode_stream


@dataclass
class Window:
    doc: int
    start: int  # the window is sequence[start:end] of its document's [prefix] + tokens; input = all but the last
    end: int
    n_predicted: int  # the last n_predicted tokens of the window are scored

    @property
    def length(self) -> int:
        return self.end - self.start


def window_stride(stride: int | None, max_len: int) -> int:
    """The stride in tokens: `stride`, or half the context when None; at most the context."""
    if stride is None:
        return max(1, max_len // 2)
    if stride < 1:
        raise LmforgeError(f"the perplexity stride must be at least 1 token, got {stride}")
    return min(stride, max_len)


def rolling_windows(doc_index: int, n_tokens: int, max_len: int, stride: int) -> list[Window]:
    """Windows over the sequence [prefix] + n_tokens tokens predicting each token once (see the module)."""
    if not n_tokens:
        return []
    first = min(max_len, n_tokens)
    windows = [Window(doc_index, 0, first + 1, first)]
    predicted = first
    while predicted < n_tokens:
        end = min(predicted + stride, n_tokens)
        # end > max_len here, so the window holds max_len tokens of input (the sequence is offset by the prefix).
        windows.append(Window(doc_index, end - max_len, end + 1, end - predicted))
        predicted = end
    return windows


@torch.no_grad()
def window_loglikelihoods(model, sequences: list[np.ndarray], windows: list[Window], batch_size: int = 8,
                          progress: Callable[[int], None] | None = None) -> list[float]:
    """Summed log-probability of each window's predicted tokens, batched by length with right padding."""
    device = next(model.parameters()).device
    out = [0.0] * len(windows)
    order = sorted(range(len(windows)), key=lambda i: -windows[i].length)
    for s in range(0, len(order), batch_size):
        batch = [windows[i] for i in order[s:s + batch_size]]
        L = max(w.length - 1 for w in batch)
        ids = torch.full((len(batch), L), model.config.pad_token_id, dtype=torch.long)
        targets = torch.zeros((len(batch), L), dtype=torch.long)
        scored = torch.zeros((len(batch), L), dtype=torch.bool)
        for r, w in enumerate(batch):
            t = torch.from_numpy(sequences[w.doc][w.start:w.end].astype(np.int64))
            ids[r, :len(t) - 1] = t[:-1]
            targets[r, :len(t) - 1] = t[1:]
            scored[r, len(t) - 1 - w.n_predicted:len(t) - 1] = True
        # Right padding never reaches a real token through causal attention, so no mask is needed; the LM
        # head runs on the predicted positions only.
        scored = scored.to(device)
        with logits_at(model, lambda h: h[scored]):
            logits = model(ids.to(device))
        picked = targets.to(device)[scored]
        logprobs = token_logprobs(logits, picked).double().cpu()
        offsets = np.cumsum([0] + [w.n_predicted for w in batch])
        for r, i in enumerate(order[s:s + batch_size]):
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
               progress: Callable[[int], None] | None = None, stride: int | None = None) -> dict:
    """Per-domain and per-source bits per byte of (source, domain, text) documents; `stride` in tokens
    (None: half the context)."""
    max_len = model.config.max_sequence_length
    stride = window_stride(stride, max_len)
    prefix = model.config.bos_token_id if model.config.bos_token_id is not None else tokenizer.eos_id
    sequences, windows = [], []
    for d, ids in encode_stream(tokenizer, ((d, text) for d, (_, _, text) in enumerate(documents)), np.int32):
        sequences.append(np.concatenate((np.array([prefix], dtype=np.int32), ids)))
        windows.extend(rolling_windows(d, len(ids), max_len, stride))
    lls = window_loglikelihoods(model, sequences, windows, batch_size, progress)
    per_doc: dict[int, list[float]] = defaultdict(list)
    for w, ll in zip(windows, lls):
        per_doc[w.doc].append(ll)
    domains: dict[tuple[str, str], DomainTotals] = defaultdict(DomainTotals)
    for d, (source, domain, text) in enumerate(documents):
        totals = domains[(source, domain)]
        totals.documents += 1
        totals.tokens += len(sequences[d]) - 1
        totals.bytes += text_bytes(text)
        totals.nll.append(-math.fsum(per_doc.get(d, [])))
    result = summarize(domains)
    result["stride"] = stride
    result["context"] = max_len
    return result


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
