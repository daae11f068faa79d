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
from typing import Iterable, Iterator

import numpy as np

from lmforge.curation.taggers import (WHITESPACE, Tagger, line_windows, one_window, register_tagger,
                                       text_windows)

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("*", "-", "\u2022", "\u2023", "\u25cf", "\u25e6", "\u25aa", "\u2043", "\u2013")
ELLIPSES = ("...", "\u2026")
_starts_with_bullet = methodcaller("startswith", BULLETS)
_ends_with_ellipsis = methodcaller("endswith", ELLIPSES)
TOP_NGRAM_SIZES = (2, 3, 4)
DUP_NGRAM_SIZES = (5, 6, 7, 8, 9, 10)
SMALL_DOC_WORDS = 256
_MULT = np.uint64(0x9E3779B97F4A7C15)

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


def _hashed_duplicate_fractions(hashes: np.ndarray, lengths: np.ndarray) -> tuple[float, float]:
    """`_duplicate_fractions` of units given as (hash, length) arrays."""
    ordered = np.sort(hashes)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if not len(repeated):
        return 0.0, 0.0
    dup = _member_mask(hashes, np.unique(repeated))
    return int(dup.sum()) / len(hashes), int(np.sum(lengths, where=dup)) / max(int(lengths.sum()), 1)


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


def _ngram_values_numpy(hashes: np.ndarray, word_lens: np.ndarray, word_chars: int) -> dict[str, float]:
    """One n-gram size at a time from the words' hashes: the n-gram hashes of size n are rolled in place over
    those of size n - 1, counted with a sort, and the positions of the most common / repeated n-grams are
    found by binary search a chunk at a time, so memory stays a few 8-byte values per word."""
    out: dict[str, float] = {}
    n_words = len(hashes)
    grams = hashes.copy()
    for n in range(2, 11):
        top_size = n in TOP_NGRAM_SIZES
        key = (f"fraction_of_characters_in_most_common_{n}grams" if top_size
               else f"fraction_of_characters_in_duplicate_{n}grams")
        if n_words < n:
            out[key] = 0.0
            continue
        grams = grams[:-1]
        grams *= _MULT
        grams += hashes[n - 1:]
        ordered = np.sort(grams)
        same = ordered[1:] == ordered[:-1]
        if top_size:
            run_ends = np.append(np.flatnonzero(~same), len(grams) - 1)
            runs = np.diff(run_ends, prepend=-1)
            top = int(runs.max())
            first = 0 if top == 1 else _first_member(grams, ordered[run_ends[runs == top]])
            out[key] = top * int(word_lens[first:first + n].sum()) / word_chars
        else:
            repeated = ordered[1:][same]
            del ordered, same
            if not len(repeated):
                out[key] = 0.0
                continue
            repeated = repeated[np.concatenate(([True], repeated[1:] != repeated[:-1]))]
            starts = _member_mask(grams, repeated)
            covered = np.zeros(n_words, dtype=bool)
            for offset in range(n):  # a repeated n-gram starting at i covers words i..i+n-1
                covered[offset:offset + len(starts)] |= starts
            out[key] = int(np.sum(word_lens, where=covered, dtype=np.int64)) / word_chars
    return out


SEARCH_CHUNK = 1 << 20


def _first_member(values: np.ndarray, sorted_set: np.ndarray) -> int:
    """The first i with values[i] in sorted_set (which must hold one of the values)."""
    for lo in range(0, len(values), SEARCH_CHUNK):
        hits = np.flatnonzero(_member_mask(values[lo:lo + SEARCH_CHUNK], sorted_set))
        if len(hits):
            return lo + int(hits[0])
    raise ValueError("no value is in the set")


def _member_mask(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """values[i] in sorted_set, by binary search a chunk at a time (np.isin would sort both, copying them)."""
    mask = np.empty(len(values), dtype=bool)
    for lo in range(0, len(values), SEARCH_CHUNK):
        chunk = values[lo:lo + SEARCH_CHUNK]
        found = np.searchsorted(sorted_set, chunk)
        np.minimum(found, len(sorted_set) - 1, out=found)
        mask[lo:lo + len(chunk)] = sorted_set[found] == chunk
    return mask


def gopher_values(text: str) -> dict[str, float]:
    """All Gopher rule values of one document. A long text is read a window at a time
    (`taggers.text_windows`): words and lines become hashes and lengths in numpy arrays window by window, so
    no list of all the words or lines of the document exists."""
    values: dict[str, float] = dict.fromkeys(ATTRIBUTES, 0.0)
    values["character_count"] = float(len(text))
    values.update(_word_values(text))
    values.update(_line_and_paragraph_values(text))
    return values


def _word_values(text: str) -> dict[str, float]:
    if one_window(text):
        words = text.split()
        if len(words) < SMALL_DOC_WORDS:
            return _word_values_small(text, words)
        windows: Iterable[tuple[list[str], str]] = [(words, text)]
    else:
        windows = ((piece.split(), piece) for _, piece in text_windows(text, WHITESPACE))
    required = alpha = 0
    hashed = []
    for window_words, piece in windows:
        required += sum(map(STOP_WORDS.__contains__, window_words))
        alpha += len(_ALPHA_WORD.findall(piece))
        hashed.append(_hashed(window_words))
    hashes, word_lens = (np.concatenate(arrays) for arrays in zip(*hashed))
    del hashed
    if not len(hashes):
        return {}
    word_chars = int(word_lens.sum())
    return {**_per_word_values(text, len(hashes), word_chars, required, alpha),
            "median_word_length": float(np.median(word_lens)),
            **_ngram_values_numpy(hashes, word_lens, word_chars)}


def _word_values_small(text: str, words: list[str]) -> dict[str, float]:
    n_words = len(words)
    if not n_words:
        return {}
    word_lens = list(map(len, words))
    word_chars = sum(word_lens)
    ordered = sorted(word_lens)
    mid = n_words // 2
    required = sum(map(STOP_WORDS.__contains__, words))
    return {**_per_word_values(text, n_words, word_chars, required, len(_ALPHA_WORD.findall(text))),
            "median_word_length": float(ordered[mid] if n_words % 2 else (ordered[mid - 1] + ordered[mid]) / 2),
            **_ngram_values_small(words, word_lens, word_chars)}


def _per_word_values(text: str, n_words: int, word_chars: int, required: int, alpha: int) -> dict[str, float]:
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    return {"word_count": float(n_words), "mean_word_length": word_chars / n_words,
            "symbol_to_word_ratio": symbols / n_words, "fraction_of_words_with_alpha_character": alpha / n_words,
            "required_word_count": float(required)}


def _hashed(units: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(hash, length) of each unit as numpy arrays (`hash()` and `len` are C calls per unit)."""
    return (np.fromiter(map(hash, units), dtype=np.int64, count=len(units)).view(np.uint64),
            np.fromiter(map(len, units), dtype=np.int64, count=len(units)))


def _line_and_paragraph_values(text: str) -> dict[str, float]:
    whole = one_window(text)  # one window: count the strings themselves, as always
    bullets = ellipses = 0
    windows = []
    for _, _, piece_lines in line_windows(text):
        lines = list(filter(str.strip, piece_lines))  # non-blank lines; map/filter keep the loops in C
        bullets += sum(map(_starts_with_bullet, map(str.lstrip, lines)))
        ellipses += sum(map(_ends_with_ellipsis, map(str.rstrip, lines)))
        windows.append(lines if whole else _hashed(lines))
    if whole:
        n_lines = len(windows[0])
        duplicate_lines = _duplicate_fractions(windows[0])
    else:
        hashes, lengths = (np.concatenate(arrays) for arrays in zip(*windows))
        n_lines = len(hashes)
        duplicate_lines = _hashed_duplicate_fractions(hashes, lengths)
    if not n_lines:
        return {}
    values = {"fraction_of_lines_starting_with_bullet_point": bullets / n_lines,
              "fraction_of_lines_ending_with_ellipsis": ellipses / n_lines}
    values["fraction_of_duplicate_lines"], values["fraction_of_characters_in_duplicate_lines"] = duplicate_lines
    if n_lines > 1:  # one line cannot make two paragraphs
        if whole:
            duplicates = _duplicate_fractions([p for p in _PARAGRAPH_BREAK.split(text.strip()) if p.strip()])
        else:
            pairs = np.array([(hash(p), len(p)) for p in _paragraphs(text)], dtype=np.int64).reshape(-1, 2)
            duplicates = _hashed_duplicate_fractions(pairs[:, 0].copy().view(np.uint64), pairs[:, 1].copy())
        values["fraction_of_duplicate_paragraphs"], values["fraction_of_characters_in_duplicate_paragraphs"] = duplicates
    return values


def _paragraphs(text: str) -> Iterator[str]:
    """The non-blank pieces of `_PARAGRAPH_BREAK.split(text.strip())`, one at a time."""
    start = len(text) - len(text.lstrip())
    end = len(text.rstrip())
    for brk in _PARAGRAPH_BREAK.finditer(text, start, end):
        paragraph = text[start:brk.start()]
        if paragraph and not paragraph.isspace():
            yield paragraph
        start = brk.end()
    paragraph = text[start:end]
    if paragraph and not paragraph.isspace():
        yield paragraph


@register_tagger("gopher")
class GopherTagger(Tagger):
    """Document-level Gopher quality signals; one `[0, len(text), value]` span per attribute."""

    attributes = ATTRIBUTES

    def tag(self, doc: dict) -> dict:
        text = doc["text"]
        end = len(text)
        return {key: [[0, end, value]] for key, value in gopher_values(text).items()}
