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


@lru_cache(maxsize=1)
def naughty_words() -> tuple[frozenset[str], tuple[tuple[str, re.Pattern], ...]]:
    """(single-token words, (entry, boundary regex) for entries with spaces or punctuation)."""
    path = Path(__file__).with_name("resources") / "naughty_words_en.txt"
    entries = [w.strip().lower() for w in path.read_text(encoding="utf-8").splitlines() if w.strip()]
    tokens = frozenset(w for w in entries if _WORD.fullmatch(w))
    phrases = tuple((w, re.compile(r"(?<!\w)" + re.escape(w) + r"(?!\w)")) for w in entries if not _WORD.fullmatch(w))
    return tokens, phrases


def has_naughty_word(lower: str) -> bool:
    # C4 matches bad words between non-word characters; tokenising on \w+ gives the same boundaries.
    tokens, phrases = naughty_words()
    if not tokens.isdisjoint(_WORD.findall(lower)):
        return True
    return any(phrase in lower and pattern.search(lower) for phrase, pattern in phrases)


def c4_attributes(text: str) -> dict[str, list[list[float]]]:
    no_punct: list[list[float]] = []
    few_words: list[list[float]] = []
    javascript: list[list[float]] = []
    sentences = 0
    start = 0
    lines = text.split("\n")
    last = len(lines) - 1
    for i, line in enumerate(lines):
        end = start + len(line) + (i < last)
        stripped = line.strip()
        bad = False
        if not stripped.endswith(END_MARKS):
            no_punct.append([start, end, 1.0])
            bad = True
        if len(stripped.split()) < MIN_WORDS_PER_LINE:
            few_words.append([start, end, 1.0])
            bad = True
        if "javascript" in stripped.lower():
            javascript.append([start, end, 1.0])
            bad = True
        if not bad:
            sentences += len(_SENTENCE_END.findall(stripped))
        start = end
    lower = text.lower()
    n = len(text)
    return {
        "lines_with_no_ending_punctuation": no_punct,
        "lines_with_too_few_words": few_words,
        "lines_with_javascript": javascript,
        "has_naughty_word": [[0, n, 1.0]] if has_naughty_word(lower) else [],
        "has_lorem_ipsum": [[0, n, 1.0]] if "lorem ipsum" in lower else [],
        "has_curly_brace": [[0, n, 1.0]] if "{" in text else [],
        "sentence_count": [[0, n, float(sentences)]],
        "line_count": [[0, n, float(len(lines))]],
    }


@register_tagger("c4")
class C4Tagger(Tagger):
    attributes = ("lines_with_no_ending_punctuation", "lines_with_too_few_words", "lines_with_javascript",
                  "has_naughty_word", "has_lorem_ipsum", "has_curly_brace", "sentence_count", "line_count")

    def tag(self, doc: dict) -> dict:
        return c4_attributes(doc["text"])
