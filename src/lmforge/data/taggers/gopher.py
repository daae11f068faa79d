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

import numpy as np

from lmforge.data.taggers import Tagger, register_tagger

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("*", "-", "\u2022", "\u2023", "\u25cf", "\u25e6", "\u25aa", "\u2043", "\u2013")
ELLIPSES = ("...", "\u2026")
TOP_NGRAM_SIZES = (2, 3, 4)
DUP_NGRAM_SIZES = (5, 6, 7, 8, 9, 10)
SMALL_DOC_WORDS = 48
_MULT = np.uint64(0x9E3779B97F4A7C15)

# A word "has an alphabetic character" if it contains a letter; the lookbehind anchors the match at word
# starts, so the scan is linear even for long letterless words.
_ALPHA_WORD = re.compile(r"(?<!\S)\S*?[^\W\d_]")
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
    if not units:
        return 0.0, 0.0
    counts = Counter(units)
    dup_units = dup_chars = 0
    for unit, count in counts.items():
        if count > 1:
            dup_units += count
            dup_chars += count * len(unit)
    total_chars = sum(map(len, units))
    return dup_units / len(units), dup_chars / max(total_chars, 1)


def _ngram_values_small(words: list[str], word_chars: int) -> dict[str, float]:
    out: dict[str, float] = {}
    lens = list(map(len, words))
    for n in TOP_NGRAM_SIZES + DUP_NGRAM_SIZES:
        if len(words) < n:
            value = 0.0
        else:
            grams = list(zip(*[words[i:] for i in range(n)]))
            counts = Counter(grams)
            if n in TOP_NGRAM_SIZES:
                best, count = max(counts.items(), key=lambda kv: kv[1])  # first of the most common, as Counter
                value = count * sum(map(len, best)) / max(word_chars, 1)
            else:
                covered = [False] * len(words)
                for i, gram in enumerate(grams):
                    if counts[gram] > 1:
                        covered[i:i + n] = [True] * n
                value = sum(l for l, c in zip(lens, covered) if c) / max(word_chars, 1)
        key = (f"fraction_of_characters_in_most_common_{n}grams" if n in TOP_NGRAM_SIZES
               else f"fraction_of_characters_in_duplicate_{n}grams")
        out[key] = value
    return out


def _ngram_values_numpy(words: list[str], word_lens: np.ndarray, word_chars: int) -> dict[str, float]:
    out: dict[str, float] = {}
    n_words = len(words)
    hashes = np.fromiter(map(hash, words), dtype=np.int64, count=n_words).view(np.uint64)
    cum = np.concatenate(([0], np.cumsum(word_lens)))
    rolled = hashes
    for n in range(2, 11):
        rolled = rolled[:-1] * _MULT + hashes[n - 1:]
        gram_chars = cum[n:] - cum[:-n]
        _, first, inverse, counts = np.unique(rolled, return_index=True, return_inverse=True, return_counts=True)
        if n in TOP_NGRAM_SIZES:
            top = counts.max()
            first_top = first[counts == top].min()
            out[f"fraction_of_characters_in_most_common_{n}grams"] = float(top * gram_chars[first_top] / word_chars)
        else:
            starts = np.flatnonzero(counts[inverse] > 1)
            if starts.size == 0:
                value = 0.0
            else:
                depth = np.cumsum(np.bincount(starts, minlength=n_words + 1)
                                  - np.bincount(starts + n, minlength=n_words + 1))[:n_words]
                value = float(word_lens[depth > 0].sum() / word_chars)
            out[f"fraction_of_characters_in_duplicate_{n}grams"] = value
    return out


def gopher_values(text: str) -> dict[str, float]:
    """All Gopher rule values of one document."""
    words = text.split()
    n_words = len(words)
    values: dict[str, float] = dict.fromkeys(ATTRIBUTES, 0.0)
    values["character_count"] = float(len(text))
    values["word_count"] = float(n_words)
    if n_words:
        word_lens = np.fromiter(map(len, words), dtype=np.int64, count=n_words)
        word_chars = int(word_lens.sum())
        values["mean_word_length"] = word_chars / n_words
        values["median_word_length"] = float(np.median(word_lens))
        symbols = text.count("#") + text.count("...") + text.count("\u2026")
        values["symbol_to_word_ratio"] = symbols / n_words
        values["fraction_of_words_with_alpha_character"] = len(_ALPHA_WORD.findall(text)) / n_words
        values["required_word_count"] = float(sum(map(STOP_WORDS.__contains__, words)))
        if n_words < SMALL_DOC_WORDS:
            values.update(_ngram_values_small(words, word_chars))
        else:
            values.update(_ngram_values_numpy(words, word_lens, word_chars))

    lines = [line for line in text.split("\n") if line.strip()]
    if lines:
        bullets = sum(1 for line in lines if line.lstrip().startswith(BULLETS))
        ellipses = sum(1 for line in lines if line.rstrip().endswith(ELLIPSES))
        values["fraction_of_lines_starting_with_bullet_point"] = bullets / len(lines)
        values["fraction_of_lines_ending_with_ellipsis"] = ellipses / len(lines)
        (values["fraction_of_duplicate_lines"],
         values["fraction_of_characters_in_duplicate_lines"]) = _duplicate_fractions(lines)
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
