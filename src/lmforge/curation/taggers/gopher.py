"""Gopher quality rules (Rae et al. 2021, "Scaling Language Models", appendix A.1), every value exposed.

The tagger only measures; thresholds live in the mixer config (configs/data/gopher_c4_mix.yaml has the
paper's). Where Dolma's `gopher_v1` departs from the paper we follow the paper (docs/curation.md lists each
difference): mean (not median) word length, blank lines are not lines, duplicate paragraphs are measured, and
characters in duplicate 5..10-grams are counted once even when n-grams overlap.

Words are `str.split()` tokens. N-gram statistics are vectorised: each word is hashed once (`hash()` is a C
call per word), n-gram hashes are rolled with numpy, and counting is a sort. Short documents take a plain
Python path that gives identical values without numpy's per-call overhead.
"""

from __future__ import annotations

import re
from collections import Counter
from itertools import accumulate
from operator import methodcaller

import numpy as np

from lmforge.curation.taggers import Tagger, register_tagger

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("*", "-", "\u2022", "\u2023", "\u25cf", "\u25e6", "\u25aa", "\u2043", "\u2013")
ELLIPSES = ("...", "\u2026")
_starts_with_bullet = methodcaller("startswith", BULLETS)
_ends_with_ellipsis = methodcaller("endswith", ELLIPSES)
TOP_NGRAM_SIZES = (2, 3, 4)
DUP_NGRAM_SIZES = (5, 6, 7, 8, 9, 10)
SMALL_DOC_WORDS = 256
_MULT = np.uint64(0x9E3779B97F4A7C15)
_SIZE_TAGS = [np.uint64((n * 0xD6E8FEB86659FD93) % (1 << 64)) for n in range(2, 11)]

# One match per word that contains a letter ([^\W\d_]): from its first letter to the end of the word.
# Starting with a character class lets `re` skip ahead to candidates, which keeps the scan fast.
_ALPHA_WORD = re.compile(r"[^\W\d_]\S*")
_PARAGRAPH_BREAK = re.compile(r"\n[^\S\n]*\n\s*")

ATTRIBUTES = (
    "character_count", "word_count", "mean_word_length", "median_word_length", "symbol_to_word_ratio",
    "fraction_of_words_with_alpha_character", "required_word_count",
    "fraction_of_lines_starting_with_bullet_point", "fraction_of_lines_ending_with_ellipsis",
    "fraction_of_duplicate_lines", "fraction_of_characters_in_duplicate_lines",
    "fraction_of_duplicate_paragraphs", "fraction_of_characters_in_duplicate_paragraphs",
    *(f"fraction_of_characters_in_most_common_{n}grams" for n in TOP_NGRAM_SIZES),
    *(f"fraction_of_characters_in_duplicate_{n}grams" for n in DUP_NGRAM_SIZES),
)


def _duplicate_fractions(units: list[str]) -> tuple[float, float]:
    """(fraction of units that occur more than once, fraction of their characters); every copy counts."""
    counts = Counter(units)
    if len(counts) == len(units):  # the common case: nothing repeats
        return 0.0, 0.0
    dup_units = dup_chars = 0
    for unit, count in counts.items():
        if count > 1:
            dup_units += count
            dup_chars += count * len(unit)
    total_chars = sum(map(len, units))
    return dup_units / len(units), dup_chars / max(total_chars, 1)


def _ngram_values_small(words: list[str], word_lens: list[int], word_chars: int) -> dict[str, float]:
    """Pure-Python path for short documents. N-grams are exact integers (base = vocabulary size); once no
    n-gram repeats, no longer one can, so the remaining sizes are filled in without counting."""
    out: dict[str, float] = {}
    n_words = len(words)
    index: dict[str, int] = {}
    ids = [index.setdefault(w, len(index)) for w in words]
    base = len(index)
    cum = list(accumulate(word_lens, initial=0))
    repeats = base < n_words
    grams = ids
    for n in range(2, 11):
        top_size = n in TOP_NGRAM_SIZES
        if n_words < n:
            value = 0.0
        elif not repeats:
            value = cum[n] / word_chars if top_size else 0.0
        else:
            grams = [a * base + b for a, b in zip(grams, ids[n - 1:])]
            counts = Counter(grams)
            top = max(counts.values())
            repeats = top > 1
            if top_size:
                first = next(i for i, g in enumerate(grams) if counts[g] == top)
                value = top * (cum[first + n] - cum[first]) / word_chars
            elif not repeats:
                value = 0.0
            else:
                covered = bytearray(n_words)
                for i, g in enumerate(grams):
                    if counts[g] > 1:
                        covered[i:i + n] = b"\x01" * n
                value = sum(l for l, c in zip(word_lens, covered) if c) / word_chars
        key = (f"fraction_of_characters_in_most_common_{n}grams" if top_size
               else f"fraction_of_characters_in_duplicate_{n}grams")
        out[key] = value
    return out


def _ngram_values_numpy(words: list[str], word_lens: np.ndarray, word_chars: int) -> dict[str, float]:
    """All nine n-gram sizes in one sort: n-gram hashes of every size are concatenated (tagged by size)."""
    n_words = len(words)
    if n_words < max(DUP_NGRAM_SIZES):  # the vectorised layout needs every size to have an n-gram
        return _ngram_values_small(words, word_lens.tolist(), word_chars)
    out: dict[str, float] = {}
    hashes = np.fromiter(map(hash, words), dtype=np.int64, count=n_words).view(np.uint64)
    cum = np.concatenate(([0], np.cumsum(word_lens)))
    rolled = [hashes]
    for n in range(2, 11):
        rolled.append(rolled[-1][:-1] * _MULT + hashes[n - 1:])
    grams = np.concatenate([r + tag for tag, r in zip(_SIZE_TAGS, rolled[1:])])
    order = np.argsort(grams)
    ordered = grams[order]
    group = np.concatenate(([0], np.cumsum(ordered[1:] != ordered[:-1])))
    occurrences = np.empty_like(group)
    occurrences[order] = np.bincount(group)[group]
    sizes = n_words - np.arange(1, 10)  # occurrences of each n-gram size, n = 2..10 (n_words >= 10 here)
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    for j, n in enumerate(TOP_NGRAM_SIZES):
        counts = occurrences[offsets[j]:offsets[j + 1]]
        top = counts.max()
        first = int(np.argmax(counts == top))  # earliest occurrence of a most common n-gram
        out[f"fraction_of_characters_in_most_common_{n}grams"] = float(top * (cum[first + n] - cum[first]) / word_chars)
    # Duplicate n-grams, all six sizes at once: +1/-1 at the start/end of every repeated occurrence, one row
    # per size, then a running sum marks the covered words.
    first_dup = offsets[len(TOP_NGRAM_SIZES)]
    dup_sizes = sizes[len(TOP_NGRAM_SIZES):]
    row = np.repeat(np.arange(len(DUP_NGRAM_SIZES)), dup_sizes)
    start = np.arange(len(row)) - np.repeat(offsets[len(TOP_NGRAM_SIZES):-1] - first_dup, dup_sizes)
    repeated = occurrences[first_dup:] > 1
    width = n_words + 1
    row, start = row[repeated], start[repeated]
    length = np.asarray(DUP_NGRAM_SIZES)[row]
    delta = (np.bincount(row * width + start, minlength=len(DUP_NGRAM_SIZES) * width)
             - np.bincount(row * width + start + length, minlength=len(DUP_NGRAM_SIZES) * width))
    covered = np.cumsum(delta.reshape(len(DUP_NGRAM_SIZES), width), axis=1)[:, :n_words] > 0
    for n, chars in zip(DUP_NGRAM_SIZES, covered @ word_lens):
        out[f"fraction_of_characters_in_duplicate_{n}grams"] = float(chars / word_chars)
    return out


def gopher_values(text: str) -> dict[str, float]:
    """All Gopher rule values of one document."""
    words = text.split()
    n_words = len(words)
    values: dict[str, float] = dict.fromkeys(ATTRIBUTES, 0.0)
    values["character_count"] = float(len(text))
    values["word_count"] = float(n_words)
    if n_words:
        symbols = text.count("#") + text.count("...") + text.count("\u2026")
        values["symbol_to_word_ratio"] = symbols / n_words
        values["fraction_of_words_with_alpha_character"] = len(_ALPHA_WORD.findall(text)) / n_words
        values["required_word_count"] = float(sum(map(STOP_WORDS.__contains__, words)))
        if n_words < SMALL_DOC_WORDS:
            word_lens = list(map(len, words))
            word_chars = sum(word_lens)
            ordered = sorted(word_lens)
            mid = n_words // 2
            values["median_word_length"] = float(ordered[mid] if n_words % 2 else (ordered[mid - 1] + ordered[mid]) / 2)
            values.update(_ngram_values_small(words, word_lens, word_chars))
        else:
            word_lens = np.fromiter(map(len, words), dtype=np.int64, count=n_words)
            word_chars = int(word_lens.sum())
            values["median_word_length"] = float(np.median(word_lens))
            values.update(_ngram_values_numpy(words, word_lens, word_chars))
        values["mean_word_length"] = word_chars / n_words

    lines = list(filter(str.strip, text.split("\n")))  # non-blank lines; map/filter keep the loops in C
    if lines:
        bullets = sum(map(_starts_with_bullet, map(str.lstrip, lines)))
        ellipses = sum(map(_ends_with_ellipsis, map(str.rstrip, lines)))
        values["fraction_of_lines_starting_with_bullet_point"] = bullets / len(lines)
        values["fraction_of_lines_ending_with_ellipsis"] = ellipses / len(lines)
        (values["fraction_of_duplicate_lines"],
         values["fraction_of_characters_in_duplicate_lines"]) = _duplicate_fractions(lines)
    if len(lines) > 1:  # one line cannot make two paragraphs
        paragraphs = [p for p in _PARAGRAPH_BREAK.split(text.strip()) if p.strip()]
        (values["fraction_of_duplicate_paragraphs"],
         values["fraction_of_characters_in_duplicate_paragraphs"]) = _duplicate_fractions(paragraphs)
    return values


@register_tagger("gopher")
class GopherTagger(Tagger):
    """Document-level Gopher quality signals; one `[0, len(text), value]` span per attribute."""

    attributes = ATTRIBUTES

    def tag(self, doc: dict) -> dict:
        text = doc["text"]
        end = len(text)
        return {key: [[0, end, value]] for key, value in gopher_values(text).items()}
