"""C4 cleaning rules (Raffel et al. 2020, section 2.2) as spans and flags; the mixer removes or drops.

Line rules give one span per offending line, newline included, so deleting the spans deletes the lines:
`lines_with_no_ending_punctuation` (stripped line does not end in . ? ! or a closing quote),
`lines_with_too_few_words` (< 5 words, the paper's number; Dolma uses 3), `lines_with_javascript`.
Document flags `has_naughty_word`, `has_lorem_ipsum`, `has_curly_brace` are `[0, len, 1.0]` when set.
`sentence_count` counts sentences in the lines that survive the line rules (C4 drops pages with < 3).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from lmforge.data.taggers import Tagger, register_tagger

MIN_WORDS_PER_LINE = 5
END_MARKS = (".", "?", "!", '"', "\u201d")
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d)\]]*(?=\s|$)")
_WORD = re.compile(r"\w+")
# A line (plus its newline) whose last non-space character is not an end mark, or that is blank.
_NO_END_MARK_LINE = re.compile(r'^(?:[^\n]*[^.?!"\u201d\s])?[^\S\n]*$\n?', re.MULTILINE)
# A line with at most MIN_WORDS_PER_LINE - 1 whitespace-separated words.
_FEW_WORDS_LINE = re.compile(r"^[^\S\n]*+(?:\S++[^\S\n]*+){0,%d}+$\n?" % (MIN_WORDS_PER_LINE - 1), re.MULTILINE)
# A line that passes both rules above: at least MIN_WORDS_PER_LINE words and an end mark.
_KEPT_LINE = re.compile(r'^(?=(?:[^\S\n]*+\S++){%d})[^\n]*[.?!"\u201d][^\S\n]*$' % MIN_WORDS_PER_LINE, re.MULTILINE)
_JAVASCRIPT_LINE = re.compile(r"^[^\n]*javascript[^\n]*$\n?", re.MULTILINE)


@lru_cache(maxsize=1)
def naughty_words() -> tuple[frozenset[str], dict[str, list[tuple[str, re.Pattern]]]]:
    """(single-token entries, first token -> boundary regexes of the multi-token entries starting with it)."""
    path = Path(__file__).with_name("resources") / "naughty_words_en.txt"
    entries = [w.strip().lower() for w in path.read_text(encoding="utf-8").splitlines() if w.strip()]
    tokens = frozenset(w for w in entries if _WORD.fullmatch(w))
    phrases: dict[str, list[tuple[str, re.Pattern]]] = {}
    for entry in entries:
        if not _WORD.fullmatch(entry):
            first = (_WORD.findall(entry) or [""])[0]
            phrases.setdefault(first, []).append((entry, re.compile(r"(?<!\w)" + re.escape(entry) + r"(?!\w)")))
    return tokens, phrases


def has_naughty_word(lower: str) -> bool:
    # C4 matches bad words between non-word characters; tokenising on \w+ gives the same boundaries.
    tokens, phrases = naughty_words()
    words = set(_WORD.findall(lower))
    if not tokens.isdisjoint(words):
        return True
    candidates = [p for first in words.intersection(phrases) for p in phrases[first]] + phrases.get("", [])
    return any(entry in lower and pattern.search(lower) for entry, pattern in candidates)


def c4_attributes(text: str) -> dict[str, list[list[float]]]:
    # Each line rule is one regex over the whole text (a match is a line plus its newline), which keeps the
    # per-line work in C; the spans equal a line-by-line loop's.
    no_punct = [[m.start(), m.end(), 1.0] for m in _NO_END_MARK_LINE.finditer(text)]
    few_words = [[m.start(), m.end(), 1.0] for m in _FEW_WORDS_LINE.finditer(text)]
    lower = text.lower()
    javascript = ([[m.start(), m.end(), 1.0] for m in _JAVASCRIPT_LINE.finditer(lower)]
                  if "javascript" in lower else [])
    kept = [m.group() for m in _KEPT_LINE.finditer(text)]
    if javascript:
        kept = [line for line in kept if "javascript" not in line.lower()]
    n = len(text)
    return {
        "lines_with_no_ending_punctuation": no_punct,
        "lines_with_too_few_words": few_words,
        "lines_with_javascript": javascript,
        "has_naughty_word": [[0, n, 1.0]] if has_naughty_word(lower) else [],
        "has_lorem_ipsum": [[0, n, 1.0]] if "lorem ipsum" in lower else [],
        "has_curly_brace": [[0, n, 1.0]] if "{" in text else [],
        "sentence_count": [[0, n, float(len(_SENTENCE_END.findall("\n".join(kept))))]],
        "line_count": [[0, n, float(text.count("\n") + 1)]],
    }


@register_tagger("c4")
class C4Tagger(Tagger):
    attributes = ("lines_with_no_ending_punctuation", "lines_with_too_few_words", "lines_with_javascript",
                  "has_naughty_word", "has_lorem_ipsum", "has_curly_brace", "sentence_count", "line_count")

    def tag(self, doc: dict) -> dict:
        return c4_attributes(doc["text"])
