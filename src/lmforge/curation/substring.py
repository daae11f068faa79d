"""Exact-substring dedup with a suffix array (Lee et al. 2022, "Deduplicating training data makes language models
better"): every run of at least `min_bytes` bytes that occurred earlier in the corpus is marked for removal.

The documents' UTF-8 texts are concatenated in source order, each followed by the byte 0xFF (which UTF-8 never
uses, so no repeat crosses a document boundary). A position q starts a repeat when the `min_bytes` bytes from q
also start at an earlier position: in the suffix array, suffixes that share their first `min_bytes` bytes are
adjacent (a run of LCP >= min_bytes), and all but the smallest position of such a run start repeats. The removed
bytes are the union of [q, q + min_bytes) over those q, so every later copy of a repeated substring of
`min_bytes` or more goes and its first occurrence stays. A character is removed when all of its bytes are (a
window may begin inside a multi-byte character). The suffix array and the LCP array come from `pydivsufsort`
(libdivsufsort and Kasai's algorithm, in C).

Memory: about 14 bytes per byte of text below 2 GiB (the text, int32 suffix and LCP arrays and a group index),
twice that above. A run whose text passes `max_text_mb` is searched in groups of consecutive shards of at most
half of it, each paired with every earlier group in an array of its own (`repeated_spans(..., earlier=...)`):
the same bytes are marked, k groups take 1 + k (k - 1) / 2 arrays, and a single shard over half the limit is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from lmforge.core.config import require

SEPARATOR = 0xFF


@dataclass
class SubstringConfig:
    """`substring:` of `data dedup`."""

    min_bytes: int = 500
    max_text_mb: float = 4096.0  # text held at once; the arrays take about 13 bytes per byte more

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        require(self.min_bytes >= 1, "min_bytes", self.min_bytes, "must be >= 1")
        require(self.max_text_mb > 0, "max_text_mb", self.max_text_mb, "must be positive")


def repeated_spans(texts: list[bytes], min_bytes: int,
                   earlier: Iterable[list[bytes]] = ()) -> tuple[list[list[list[int]]], int]:
    """Per document: the [start, end) character spans of its text that repeat an earlier substring of at least
    `min_bytes` bytes (earlier: in an earlier document, or earlier in the same one); and the bytes removed.

    `earlier`: groups of texts that precede `texts` in source order but are not held with them. Each is paired
    with `texts` in a suffix array of its own (the pair's repeats include those within `texts`), and the
    marked bytes are the union over the pairs: the same as one array over everything, holding two groups at once.
    """
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    corpus = _joined(texts)
    covered = None
    for group in earlier:
        joined = np.concatenate([_joined(group), corpus])
        del group  # held while the next group is read otherwise
        pair = _covered(joined, min_bytes)[len(joined) - len(corpus):]
        covered = pair if covered is None else covered | pair
    if covered is None:
        covered = _covered(corpus, min_bytes)
    return _character_spans(corpus, covered, lengths), int(np.count_nonzero(covered))


def _joined(texts: list[bytes]) -> np.ndarray:
    return np.frombuffer(bytearray(b"\xff".join(texts) + b"\xff"), dtype=np.uint8)


def _covered(corpus: np.ndarray, min_bytes: int) -> np.ndarray:
    """Per byte: inside a window of `min_bytes` bytes that also starts at an earlier position."""
    from pydivsufsort import divsufsort, kasai

    starts_of_repeats = np.zeros(0, dtype=np.int64)
    if len(corpus) > min_bytes:
        suffixes = divsufsort(corpus)  # int32 below 2 GiB
        lcp = kasai(corpus, suffixes)  # lcp[i]: common prefix of suffixes i and i + 1
        # adjacent suffixes sharing >= min_bytes bytes form a group; all but its smallest position are repeats
        new_group = np.r_[True, lcp[:-1] < min_bytes]
        del lcp
        group = np.cumsum(new_group, dtype=suffixes.dtype) - 1
        first = np.minimum.reduceat(suffixes, np.flatnonzero(new_group))[group]
        del group
        starts_of_repeats = suffixes[suffixes != first].astype(np.int64)
        # equal windows contain 0xFF together, so the separator check on one copy bounds both to a document
        starts_of_repeats = starts_of_repeats[_window_inside_document(corpus, starts_of_repeats, min_bytes)]
    size = len(corpus) + min_bytes + 1
    depth = np.bincount(starts_of_repeats, minlength=size) - np.bincount(starts_of_repeats + min_bytes, minlength=size)
    return np.cumsum(depth[:len(corpus)]) > 0


def _window_inside_document(corpus: np.ndarray, positions: np.ndarray, width: int) -> np.ndarray:
    separators = np.r_[0, np.cumsum(corpus == SEPARATOR)]
    positions = positions.astype(np.int64)
    ends = positions + width
    inside = ends <= len(corpus)
    inside[inside] = separators[ends[inside]] == separators[positions[inside]]
    return inside


def _character_spans(corpus: np.ndarray, covered: np.ndarray, lengths: np.ndarray) -> list[list[list[int]]]:
    """Runs of removed characters per document, in code points."""
    spans: list[list[list[int]]] = [[] for _ in lengths]
    doc_start = np.r_[0, np.cumsum(lengths + 1)[:-1]]
    is_char = ((corpus & 0xC0) != 0x80) & (corpus != SEPARATOR)
    char_pos = np.flatnonzero(is_char)
    if not len(char_pos) or not covered.any():
        return spans
    # a character's bytes run to the next character or separator; all of them must be covered
    boundary = np.flatnonzero((corpus == SEPARATOR) | is_char)
    char_end = boundary[np.searchsorted(boundary, char_pos, side="right")]
    uncovered = np.r_[0, np.cumsum(~covered)]
    removed = uncovered[char_end] == uncovered[char_pos]
    doc = np.searchsorted(doc_start, char_pos, side="right") - 1
    index = np.arange(len(char_pos)) - np.searchsorted(doc, doc)  # code point index within its document
    begins = removed & ~np.r_[False, removed[:-1] & (doc[1:] == doc[:-1])]
    ends = removed & ~np.r_[removed[1:] & (doc[1:] == doc[:-1]), False]
    for d, s, e in zip(doc[begins].tolist(), index[begins].tolist(), (index[ends] + 1).tolist()):
        spans[d].append([s, e])
    return spans
