"""Baselines for bits per byte: what a model must beat on the same held-out documents.

- `unigram`: each token drawn independently from the training tokens' frequencies, add-one smoothed over
  the vocabulary: p(t) = (c(t) + 1) / (N + V), with the counts of the token files a model trained on minus
  their document-boundary tokens (BOS, EOS), which the held-out scoring never predicts. A document costs
  -sum log2 p(t) over its tokens, as `eval.perplexity` scores them.
- `gzip`, `zstd`: general-purpose compressors, each document compressed on its own, since the model also
  scores each document on its own: gzip -9's DEFLATE stream without the gzip header and trailer (raw
  DEFLATE, level 9), and a zstd level-19 frame without checksum or content size.

bits per byte = 8 x compressed bytes (or -log2 likelihood) / UTF-8 bytes of the text, per source (the
documents' `source` field, as in `eval.perplexity`) and in total.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import zstandard

from lmforge.core.errors import LmforgeError
from lmforge.core.files import atomic_write_json
from lmforge.core.locks import output_lock
from lmforge.core.manifest import write_manifest
from lmforge.curation.documents import ReadReport, expand_globs, text_bytes
from lmforge.eval.perplexity import collect_documents
from lmforge.tokens.token_files import open_token_file, resolve_token_paths
from lmforge.tokens.tokenizer import Tokenizer, encode_stream, find_tokenizer, tokens_tokenizer

ZSTD_LEVEL = 19
DEFLATE_LEVEL = 9


def deflate_size(data: bytes) -> int:
    compressor = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -15)  # wbits -15: raw DEFLATE, no header
    return len(compressor.compress(data) + compressor.flush())


def zstd_size(data: bytes) -> int:
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=False, write_content_size=False)
    return len(compressor.compress(data))


COMPRESSORS = {"gzip": deflate_size, "zstd": zstd_size}


def token_counts(token_paths: list[str], vocab_size: int) -> np.ndarray:
    """How often each id occurs in the token files, document-boundary tokens included."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for path in resolve_token_paths(token_paths):
        tokens = open_token_file(path).tokens
        counts += np.bincount(tokens, minlength=vocab_size)[:vocab_size]
    return counts


def unigram_log2_probs(counts: np.ndarray, boundary_ids: list[int]) -> np.ndarray:
    """log2 of the add-one smoothed unigram distribution, boundary tokens' counts removed."""
    counts = counts.astype(np.float64).copy()
    counts[[i for i in boundary_ids if i is not None]] = 0
    return np.log2((counts + 1) / (counts.sum() + len(counts)))


def baseline_bits_per_byte(documents: list[tuple[str, str, str]], log2_probs: np.ndarray,
                           tokenizer: Tokenizer) -> dict:
    """Per source and in total: bytes, documents, and each baseline's bits per byte of (source, domain, text)."""
    totals: dict[str, dict] = defaultdict(lambda: {"documents": 0, "bytes": 0, "tokens": 0,
                                                   "bits": {"unigram": [], **{c: [] for c in COMPRESSORS}}})
    encoded = encode_stream(tokenizer, ((i, text) for i, (_, _, text) in enumerate(documents)), np.int64)
    for i, ids in encoded:
        source, _, text = documents[i]
        data = text.encode("utf-8")
        for key in (source, "total"):
            row = totals[key]
            row["documents"] += 1
            row["bytes"] += text_bytes(text)
            row["tokens"] += len(ids)
            row["bits"]["unigram"].append(-float(log2_probs[ids].sum()))
            for name, size in COMPRESSORS.items():
                row["bits"][name].append(8 * size(data))
    out = {}
    for key, row in sorted(totals.items(), key=lambda kv: kv[0] == "total"):
        bits = row.pop("bits")
        out[key] = {**row, **{f"{name}_bits_per_byte": math.fsum(values) / row["bytes"] if row["bytes"] else None
                              for name, values in bits.items()}}
    return out


def run_baselines(tokens: list[str], ppl: list[str], out: str | Path, tokenizer: str | None = None) -> dict:
    """Unigram (fitted on the token files `tokens`) and compressors on the held-out documents `ppl`; writes
    OUT/results.json and its manifest."""
    name = tokenizer or tokens_tokenizer(tokens)
    if name is None:
        raise LmforgeError(f"no tokenizer next to {tokens[0]}: give --tokenizer")
    loaded = find_tokenizer(name)
    paths = expand_globs(ppl)
    report = ReadReport()
    documents = collect_documents(paths, None, report)
    if not documents:
        raise LmforgeError(f"no documents to score in {', '.join(ppl)}")
    counts = token_counts(tokens, loaded.vocab_size)
    log2_probs = unigram_log2_probs(counts, [loaded.eos_id, loaded.bos_id])
    results = {"sources": baseline_bits_per_byte(documents, log2_probs, loaded),
               "unigram": {"training_tokens": int(counts.sum()), "vocab_size": loaded.vocab_size,
                           "smoothing": "add-one"},
               "compressors": {"gzip": f"raw DEFLATE level {DEFLATE_LEVEL} per document",
                               "zstd": f"zstd level {ZSTD_LEVEL} per document"},
               "read_report": report.to_dict()}
    out = Path(out)
    with output_lock(out):
        atomic_write_json(out / "results.json", results)
        write_manifest(out, command="baselines", config={"tokens": tokens, "ppl": ppl, "tokenizer": name},
                       inputs=[*paths, *resolve_token_paths(tokens)],
                       counts={"documents": len(documents), "skipped": report.skipped})
    return results
